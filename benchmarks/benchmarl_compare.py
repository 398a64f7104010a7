"""Training throughput: vimarl's MASAC against BenchMARL's MASAC on MPE simple_spread, side by side.

Task: cooperative navigation with 3 agents, 3 landmarks, 25-step episodes, discrete actions,
local_ratio 0.5: vimarl's `spread` (batched torch re-implementation of mpe2 simple_spread_v3)
and BenchMARL's `pettingzoo/simple_spread` (PettingZoo 1.24.3's simple_spread_v3 through
torchrl's PettingZooEnv; the B environments run one after another in a torchrl SerialEnv, as
BenchMARL does for every non-vectorised task). Both sides get the same budget (`Budget`): the same
env frames (steps summed over the B parallel environments), B, frames per update, optimizer
steps per update, batch size, replay capacity, two hidden ReLU layers of the same width, one shared
policy and one shared twin critic, and the same lr / gamma / tau / fixed entropy temperature. Each
side starts with its policy acting (no random warm-up) and updates after every `update_every`
frames, so both make frames / update_every * gradient_steps optimizer steps.

Each side runs in its own subprocess (imports and set-up untimed) and times its training loop:
vimarl what `vimarl train masac spread ...` runs (summary.json's wall_s: collection, updates and
one evaluation at the start and the end, each 25 batched steps), BenchMARL `Experiment.run()`
(collection and updates; evaluation, loggers and checkpoints off). Within that loop each side
also adds up the time of its gradient steps (vimarl `Trainer._learn`, BenchMARL
`Experiment._optimizer_loop`: drawing the batch from the replay buffer, the losses, backward, the
optimizer and target updates). Reported: wall seconds, env frames/s and gradient steps/s over the whole loop, the same
split into the time outside the gradient steps (mostly collection: env steps and acting) and
inside them, and the mean team return (sum over agents and steps) of 10 deterministic episodes
after training.

BenchMARL 1.5.2 pins torchrl < 0.12, so it lives in its own virtual environment,
`.venv-benchmarl` (created on first use: the main venv's torch version, pinned through a
constraints file so that no dependency swaps in another build, then benchmarl and PettingZoo;
for a CUDA build of torch, point pip at its index, e.g. PIP_EXTRA_INDEX_URL). If it cannot be
set up or run, the BenchMARL row is replaced by a one-line reason.

    python benchmarks/benchmarl_compare.py                  # 24,000 frames each (a few minutes)
    python benchmarks/benchmarl_compare.py --frames 100000
    python benchmarks/benchmarl_compare.py --quick          # 4,000 frames: checks that it runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import print_machine, print_table

import vimarl

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "_benchmarl_runner.py"
DEFAULT_VENV = ROOT / ".venv-benchmarl"
# BenchMARL 1.5.2 needs torchrl >= 0.10, < 0.12. torchrl 0.11's PettingZooEnv imports MPE from
# `pettingzoo.mpe`, which PettingZoo 1.25 moved out into the separate mpe2 package, hence 1.24.3.
BENCHMARL_PACKAGES = ["benchmarl==1.5.2", "pettingzoo[mpe]==1.24.3"]
EVAL_EPISODES = 10


@dataclass(frozen=True)
class Budget:
    """What both libraries get; the defaults are MA-SAC's cooperative navigation preset
    (vimarl/configs/presets/masac-spread.yaml: 4 gradient steps of batch 1,024 per 100 frames)
    with updates grouped by 1,000 frames, so BenchMARL's per-iteration overhead stays small."""

    frames: int = 24_000
    num_envs: int = 10
    update_every: int = 1_000
    gradient_steps: int = 40
    batch_size: int = 1_024
    hidden: int = 128
    lr: float = 0.01
    gamma: float = 0.95
    tau: float = 0.01
    alpha: float = 0.02
    seed: int = 0
    device: str = "cpu"
    threads: int = 1

    def __post_init__(self):
        if self.update_every % self.num_envs or self.frames % self.update_every:
            raise ValueError(f"frames ({self.frames}) must be a multiple of update_every ({self.update_every}), "
                             f"and update_every a multiple of num_envs ({self.num_envs})")

    @property
    def total_gradient_steps(self) -> int:
        return self.frames // self.update_every * self.gradient_steps


def vimarl_overrides(budget: Budget, out: str) -> list[str]:
    """`vimarl train masac spread` key=value items for this budget (DESIGN's trainer fields)."""
    return [
        f"total_steps={budget.frames}", f"num_envs={budget.num_envs}", "warmup_steps=0",
        f"update_every={budget.update_every}", f"gradient_steps={budget.gradient_steps}",
        f"batch_size={budget.batch_size}", f"buffer_size={budget.frames}",
        f"eval_every={budget.frames}", f"eval_episodes={EVAL_EPISODES}",
        f"seed={budget.seed}", f"device={budget.device}", f"torch_threads={budget.threads}",
        "tensorboard=false", "progress=false", f"out={out}",
        f"algo.hidden_dim={budget.hidden}", "algo.parameter_sharing=true", f"algo.lr={budget.lr}",
        f"algo.gamma={budget.gamma}", f"algo.tau={budget.tau}", f"algo.alpha={budget.alpha}",
        "env.episode_length=25", "env.local_ratio=0.5", "env.action_mode=discrete",
    ]


def benchmarl_settings(budget: Budget) -> dict:
    """The JSON the BenchMARL runner applies (ExperimentConfig, MasacConfig and task fields)."""
    return {
        "experiment": {
            "max_n_frames": budget.frames, "max_n_iters": None,
            "off_policy_n_envs_per_worker": budget.num_envs,
            "off_policy_collected_frames_per_batch": budget.update_every,
            "off_policy_n_optimizer_steps": budget.gradient_steps,
            "off_policy_train_batch_size": budget.batch_size,
            "off_policy_memory_size": budget.frames, "off_policy_init_random_frames": 0,
            "prefer_continuous_actions": False, "share_policy_params": True,
            "lr": budget.lr, "gamma": budget.gamma, "soft_target_update": True, "polyak_tau": budget.tau,
            "sampling_device": "cpu",  # PettingZoo steps on the CPU
            "train_device": budget.device, "buffer_device": budget.device,
            "evaluation": False, "render": False, "loggers": [], "create_json": False,
            "checkpoint_interval": 0, "checkpoint_at_end": False,
        },
        "algorithm": {"share_param_critic": True, "num_qvalue_nets": 2, "fixed_alpha": True,
                      "alpha_init": budget.alpha},
        "task": {"N": 3, "max_cycles": 25, "local_ratio": 0.5},
        "hidden": [budget.hidden, budget.hidden],
        "seed": budget.seed, "threads": budget.threads, "eval_episodes": EVAL_EPISODES,
    }


# -- the two sides --------------------------------------------------------------------------
def _environment(threads: int) -> dict:
    """Child environment: OpenMP / MKL limited like torch, so neither side gets extra threads."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


class UpdateTimer:
    """Wraps `owner.name` (a method) to add up the seconds spent in it: the gradient steps."""

    def __init__(self, owner, name: str):
        self.seconds, method = 0.0, getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        setattr(owner, name, timed)


def train_vimarl(budget: Budget) -> dict:
    """The vimarl side, run in a child process (`--vimarl-child`): what `vimarl train masac spread
    OVERRIDES` does, with the time inside `Trainer._learn` (drawing the batches from the replay
    buffer and `algo.update`, like BenchMARL's `_optimizer_loop`) added up."""
    from vimarl.config import parse_overrides, resolve
    from vimarl.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        run = resolve("masac", "spread", parse_overrides(vimarl_overrides(budget, f"{tmp}/run")))
        trainer = Trainer(run, Path(run.train.out))
        updates = UpdateTimer(trainer, "_learn")
        trainer.train()
        summary = json.loads((Path(run.train.out) / "summary.json").read_text())
    # summary.json's wall_s: the training loop (collection, updates, the evaluations at the start
    # and the end), not the set-up, the final checkpoint or the curve plot.
    return {"frames": summary["env_steps"], "gradient_steps": summary["updates"], "wall_s": summary["wall_s"],
            "update_s": updates.seconds, "eval_return": summary["eval_return_mean"],
            "versions": {"vimarl": vimarl.__version__, "torch": torch.__version__}}


def run_child(command: list[str], threads: int, what: str) -> dict:
    """Run a side's process and return the JSON of its last `RESULT {...}` line."""
    result = subprocess.run(command, cwd=ROOT, env=_environment(threads), capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{what} failed (exit {result.returncode}): {last}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def run_vimarl(budget: Budget) -> dict:
    command = [sys.executable, __file__, "--vimarl-child", json.dumps(dataclasses.asdict(budget))]
    return run_child(command, budget.threads, "vimarl training")


def ensure_benchmarl_venv(venv: Path) -> Path:
    """Python of `venv`, creating it and installing BenchMARL when missing (raises RuntimeError
    with a one-line reason when that fails). A marker file records what was installed."""
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    wanted = "\n".join([f"torch=={torch.__version__}", *BENCHMARL_PACKAGES]) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    print(f"setting up {venv} (once): torch=={torch.__version__}, {', '.join(BENCHMARL_PACKAGES)}", file=sys.stderr)
    constraints = venv / "constraints.txt"
    steps = [
        [str(python), "-m", "pip", "install", "-q", f"torch=={torch.__version__}"],
        # Pinned through constraints: benchmarl pulls in torchvision, whose dependencies would
        # otherwise be free to swap in another (multi-GB CUDA) build of torch.
        [str(python), "-m", "pip", "install", "-q", "-c", str(constraints), *BENCHMARL_PACKAGES],
    ]
    for step in [[sys.executable, "-m", "venv", str(venv)], *steps]:
        result = subprocess.run(step, capture_output=True, text=True, check=False)
        if result.returncode:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"`{' '.join(step[1:5])} ...` failed: {last}")
        if step[-1] == str(venv):  # the venv exists now
            constraints.write_text(f"torch=={torch.__version__}\n")
    marker.write_text(wanted)
    return python


def run_benchmarl(budget: Budget, python: Path) -> dict:
    settings = benchmarl_settings(budget)
    with tempfile.TemporaryDirectory() as tmp:  # BenchMARL writes an experiment folder even without loggers
        settings["experiment"]["save_folder"] = tmp
        return run_child([str(python), str(RUNNER), json.dumps(settings)], budget.threads, "the BenchMARL runner")


# -- command line -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> tuple[Budget, argparse.Namespace]:
    defaults = Budget()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=defaults.frames, help="env frames per library")
    parser.add_argument("--quick", action="store_true", help="4,000 frames: checks that it runs, timings rough")
    parser.add_argument("--num-envs", type=int, default=defaults.num_envs)
    parser.add_argument("--update-every", type=int, default=defaults.update_every, help="frames per update")
    parser.add_argument("--gradient-steps", type=int, default=defaults.gradient_steps, help="per update")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default="cpu", help="training device of both (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both (default 1)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="BenchMARL's virtual environment")
    parser.add_argument("--vimarl-child", metavar="BUDGET_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    budget = Budget(frames=4_000 if args.quick else args.frames, num_envs=args.num_envs,
                    update_every=args.update_every, gradient_steps=args.gradient_steps,
                    batch_size=args.batch_size, hidden=args.hidden, seed=args.seed,
                    device=args.device, threads=args.threads)
    return budget, args


def main(argv: list[str] | None = None) -> int:
    budget, args = parse_args(argv)
    if args.vimarl_child:
        print("RESULT " + json.dumps(train_vimarl(Budget(**json.loads(args.vimarl_child)))), flush=True)
        return 0
    torch.set_num_threads(budget.threads)  # what the two subprocesses use, so the machine line says so
    print_machine(budget.device)
    print("task: MPE simple_spread, 3 agents, 25-step episodes, discrete actions; budget: "
          + ", ".join(f"{field.name}={getattr(budget, field.name)}" for field in dataclasses.fields(budget))
          + f" ({budget.total_gradient_steps} gradient steps)\n")

    results, failures = {}, []
    sides = {"vimarl": lambda: run_vimarl(budget),
             "BenchMARL": lambda: run_benchmarl(budget, ensure_benchmarl_venv(args.venv))}
    for name, run in sides.items():
        try:
            results[name] = run()
        except RuntimeError as error:  # one line, then the other side still runs
            failures.append(f"{name} not run: {error}")

    rows = [[name, "spread" if name == "vimarl" else "pettingzoo/simple_spread", f"{r['frames']:,}",
             f"{r['gradient_steps']:,}", f"{r['wall_s']:.1f}", f"{r['update_s']:.1f}",
             f"{r['frames'] / r['wall_s']:,.0f}", f"{r['gradient_steps'] / r['wall_s']:,.1f}",
             f"{r['frames'] / (r['wall_s'] - r['update_s']):,.0f}", f"{r['gradient_steps'] / r['update_s']:,.1f}",
             f"{r['eval_return']:.1f}"] for name, r in results.items()]
    print_table(["MASAC", "task", "frames", "gradient steps", "wall s", "of which updates s", "frames/s",
                 "gradient steps/s", "frames/s outside updates", "gradient steps/s of update time",
                 f"eval return ({EVAL_EPISODES} ep.)"], rows)
    if len(results) == 2:
        ratio = lambda key: results["BenchMARL"][key] / results["vimarl"][key]
        print(f"BenchMARL / vimarl time: {ratio('wall_s'):.1f}x in all, {ratio('update_s'):.2f}x in gradient steps")
    for name, r in results.items():
        print(f"{name} versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
    for failure in failures:
        print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
