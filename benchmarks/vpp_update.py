"""VPP on grid_coordination: time per update, time per act(), and pure env stepping.

Environment: grid_coordination with side n in (3, 10, 35), i.e. N = 9, 100, 1,225 agents on
a 4-neighbour grid (K = 4). The algorithm is make_algo("vpp", env) with its default config
(2 mean-field rounds, 2 heads, embed 32, hidden 128, one Q network).

1. update: a ReplayBuffer is filled through TransitionCodec with FILL_STEPS vectorised steps
   of FILL_ENVS environments acting with the (untrained) policy, as tests/test_algos.py does.
   "update" times algo.update on one decoded batch (Q, policy and V gradient steps plus the
   target polyak step); "sample+decode" times buffer.sample + codec.decode, which the update
   column excludes. Rows = batch * N agent-transitions; combinations above MAX_ROWS rows are
   skipped.
2. act: act(..., explore=True) (sampling, no_grad) on B = 8 environments.
3. env.step: pure environment stepping with a fixed random action tensor, no policy; every
   step also auto-resets, since grid_coordination episodes last one step.

Each cell is the median of repeated samples after warm-up calls (benchmarks/common.py).

    python benchmarks/vpp_update.py [--threads T] [--quick]
"""

from __future__ import annotations

import torch

import vimarl
from common import parse_args, print_machine, print_table, time_ms
from vimarl.buffer import ReplayBuffer, TransitionCodec
from vimarl.train import act, fill_replay

GRID_SIDES = (3, 10, 35)
BATCH_SIZES = (32, 128, 1024)
MAX_ROWS = 300_000
FILL_ENVS, FILL_STEPS = 64, 4
ACT_ENVS = 8
STEP_ENVS = (8, 256)


def filled_buffer(env, algo) -> tuple[TransitionCodec, ReplayBuffer]:
    return fill_replay(env, algo, FILL_STEPS, capacity=FILL_ENVS * FILL_STEPS)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    # (warm-up, repeats) for the slow update calls and for the fast act / step calls
    slow, fast = ((1, 2), (1, 3)) if args.quick else ((2, 7), (5, 25))
    print_machine()
    torch.manual_seed(0)

    update_rows, act_rows, step_rows = [], [], []
    for side in GRID_SIDES:
        n = side * side
        env = vimarl.make_env("grid_coordination", FILL_ENVS, seed=0, n=side)
        algo = vimarl.make_algo("vpp", env)
        codec, buffer = filled_buffer(env, algo)
        for batch_size in BATCH_SIZES:
            rows = batch_size * n
            if rows > MAX_ROWS:
                update_rows.append([n, batch_size, f"{rows:,}", f"skipped (batch x N > {MAX_ROWS:,} rows)", "", ""])
                continue
            batch = codec.decode(buffer.sample(batch_size))
            update_ms = time_ms(lambda: algo.update(batch), *slow)
            decode_ms = time_ms(lambda: codec.decode(buffer.sample(batch_size)), *fast)
            update_rows.append([n, batch_size, f"{rows:,}", f"{update_ms:.1f}",
                                f"{rows / update_ms * 1e3:,.0f}", f"{decode_ms:.2f}"])

        act_env = vimarl.make_env("grid_coordination", ACT_ENVS, seed=0, n=side)
        step = act_env.reset(seed=0)
        act_ms = time_ms(lambda: act(algo, step, explore=True), *fast)
        act_rows.append([n, ACT_ENVS, f"{act_ms:.2f}", f"{ACT_ENVS * n / act_ms * 1e3:,.0f}"])

        for num_envs in STEP_ENVS:
            step_env = vimarl.make_env("grid_coordination", num_envs, seed=0, n=side)
            step_env.reset(seed=0)
            actions = {"agents": torch.randint(0, 2, (num_envs, n))}
            step_ms = time_ms(lambda: step_env.step(actions), *fast)
            step_rows.append([n, num_envs, f"{step_ms:.3f}", f"{num_envs * n / step_ms * 1e3:,.0f}"])

    print("VPP update (one gradient step of Q, policy and V), ms per call\n")
    print_table(["N agents", "batch", "rows (batch x N)", "update ms", "agent-rows/s",
                 "sample+decode ms"], update_rows)
    print(f"VPP act(explore=True) on B = {ACT_ENVS} environments\n")
    print_table(["N agents", "B", "act ms", "agent-actions/s"], act_rows)
    print("grid_coordination env.step with random actions (no policy)\n")
    print_table(["N agents", "num_envs", "step ms", "agent-steps/s"], step_rows)


if __name__ == "__main__":
    main()
