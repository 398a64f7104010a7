"""VPP end to end on the papers' largest traffic grid (`traffic_grid_35x35`, 1,225 agents).

Trains `vpp` for a short budget (default 400 env steps = 4 episodes of 100 decisions, one
sub-environment), with the trainer's evaluation before and after, then runs the fixed-time and
max-pressure controllers on the same evaluation episodes (same seed) and prints: wall time,
env steps per second (training alone: the two evaluations' time taken out), peak memory
(resource.getrusage's ru_maxrss: the process's lifetime peak resident set; on CUDA also
torch.cuda.max_memory_allocated) and the average travel time before / after training against
fixed-time and max-pressure. A few hundred steps check that VPP runs at this scale; they do not
train it to the papers' level (1-1.5M env steps, 000 App. H).

    python benchmarks/traffic_vpp_35x35.py                  # 400 env steps, CPU
    python benchmarks/traffic_vpp_35x35.py --steps 200 --device cuda
"""

from __future__ import annotations

import argparse
import csv
import resource
import tempfile
import time
from pathlib import Path

import torch
from common import print_machine

import vimarl
from vimarl.envs.traffic import FixedTimePolicy, MaxPressurePolicy
from vimarl.checkpoint import load_trained
from vimarl.train import eval_seed, evaluate

ENV = "traffic_grid_35x35"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="env steps to train (default 400)")
    parser.add_argument("--num-envs", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=100, help="env steps of random actions first")
    parser.add_argument("--update-every", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16, help="transitions (of 1,225 agents each)")
    parser.add_argument("--eval-episodes", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_machine(args.device)
    settings = {"total_steps": args.steps, "num_envs": args.num_envs, "warmup_steps": args.warmup,
                "update_every": args.update_every, "gradient_steps": 1, "batch_size": args.batch_size,
                "buffer_size": args.steps, "eval_every": args.steps, "eval_episodes": args.eval_episodes,
                "seed": args.seed, "device": args.device, "torch_threads": args.threads}
    print(f"vpp on {ENV}: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + ", algo: paper defaults "
          "(lr 0.01, 2 rounds, 128 hidden units), env: defaults (100 decisions of 10 s, 400 veh/h per entry road)")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = vimarl.train("vpp", ENV, out=str(Path(tmp) / "run"), progress=False, tensorboard=False, **settings)
        wall = time.perf_counter() - start
        with open(out / "metrics.csv") as file:
            rows = list(csv.DictReader(file))
        updates = int(rows[-1]["updates"])
        seed = eval_seed(0)  # the trainer's first evaluation episodes
        env = vimarl.make_env(ENV, args.eval_episodes, seed, args.device)
        _, algo, _ = load_trained(out, args.device)
        algo.to(args.device)
        start = time.perf_counter()
        trained = run_policy(algo, env, seed)
        eval_s = time.perf_counter() - start
    fixed = run_policy(FixedTimePolicy(env.groups).to(args.device), env, seed)
    pressure = run_policy(MaxPressurePolicy(env.groups).to(args.device), env, seed)
    train_s = wall - 2 * eval_s
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"\nwall time {wall:.1f} s for {args.steps} env steps and {updates} updates, two evaluations "
          f"of {args.eval_episodes} episode(s) included ({eval_s:.1f} s each)")
    print(f"env steps/s {args.steps / train_s:.2f} (training only), agent-steps/s "
          f"{args.steps * 1225 / train_s:.0f}")
    print(f"peak memory: ru_maxrss {peak:.0f} MiB" + (
        f", torch.cuda.max_memory_allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        if args.device.startswith("cuda") else ""))
    before, after = (float(rows[k]["eval_average_travel_time"]) for k in (0, -1))
    ret_before, ret_after = (float(rows[k]["eval_return_mean"]) for k in (0, -1))
    print(f"\n{'policy':<26}{'avg travel time (s)':>20}{'return':>14}")
    print(f"{'vpp before training':<26}{before:>20.1f}{ret_before:>14.0f}")
    print(f"{'vpp after ' + str(args.steps) + ' steps':<26}{after:>20.1f}{ret_after:>14.0f}")
    for name, (ret, att) in (("fixed-time (30 s)", fixed), ("max-pressure", pressure)):
        print(f"{name:<26}{att:>20.1f}{ret:>14.0f}")
    if abs(trained[1] - after) > 1e-3 * after:
        print(f"note: re-evaluating the saved policy gave {trained[1]:.1f} s")


def run_policy(policy, env, seed: int) -> tuple[float, float]:
    """(return, average travel time) over the evaluation episodes, as the trainer logs them."""
    metrics: dict = {}
    returns = evaluate(policy, env, seed, metrics=metrics)
    return (next(iter(returns.values())).mean().item(), metrics["average_travel_time"].mean().item())


if __name__ == "__main__":
    main()
