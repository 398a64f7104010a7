"""The trainer's per-step NaN / Inf check of observations and rewards against the step itself.

For each environment, B sub-environments step with uniformly random actions; "step" times
env.step, "check" times `vimarl.train.check_env_step` on the step's result (one fused sum over
every group's observations and rewards and one host sync, the trainer's check after every
vectorised step). Each cell is the median of repeated samples after warm-up calls
(benchmarks/common.py: time_ms).

    python benchmarks/finite_check.py [--threads T] [--quick]
"""

from __future__ import annotations

import vimarl
from common import parse_args, print_machine, print_table, time_ms
from vimarl.algos.base import UniformPolicy
from vimarl.train import act, check_env_step

CASES = (("coop_nav_n15", 8), ("coop_nav_n200", 8), ("traffic_grid_35x35", 4), ("grid_coordination", 256),
         ("jungle", 8))


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    fast = (2, 5) if args.quick else (10, 25)
    print_machine()
    rows = []
    for env_name, num_envs in CASES:
        env = vimarl.make_env(env_name, num_envs, seed=0)
        policy = UniformPolicy({g: s for g, s in env.groups.items() if s.role == "learned"}, seed=0)
        step = env.reset(seed=0)
        actions = act(policy, step, explore=True)
        step_ms = time_ms(lambda: env.step(actions), *fast)
        result = env.step(actions)
        check_ms = time_ms(lambda: check_env_step(result, env_name, 0), *fast)
        rows.append([env_name, num_envs, f"{step_ms:.3f}", f"{check_ms:.3f}", f"{check_ms / step_ms:.1%}"])
    print("NaN / Inf check of one vectorised step, ms\n")
    print_table(["env", "B", "env.step", "check", "check / step"], rows)


if __name__ == "__main__":
    main()
