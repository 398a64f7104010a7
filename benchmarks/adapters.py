"""Speed of the external environments and adapters, one torch thread, random actions.

    python benchmarks/adapters.py [--steps 300] [--workers 2]

Rows: each environment through vimarl (B copies) next to the same environment stepped bare
(its own PettingZoo parallel API, one copy), and the vimarl -> PettingZoo wrapper next to the
BatchedEnv it wraps. env-steps/s counts steps of one copy (B copies stepped once = B env-steps).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import time

import torch

import vimarl
from vimarl.envs.external.to_pettingzoo import to_pettingzoo


def vimarl_rate(name: str, num_envs: int, steps: int, **config) -> tuple[float, int]:
    env = vimarl.make_env(name, num_envs, seed=0, **config)
    step = env.reset(seed=0)
    generator = torch.Generator().manual_seed(0)
    learned = env.learned_groups()

    def actions():
        return {g: s.action_space.sample((num_envs, s.n_agents), generator, "cpu", step.groups[g].action_mask)
                for g, s in learned.items()}
    for _ in range(5):
        step = env.step(actions())
    start = time.perf_counter()
    for _ in range(steps):
        step = env.step(actions())
    elapsed = time.perf_counter() - start
    if hasattr(env, "close"):
        env.close()
    return num_envs * steps / elapsed, env.n_agents


def parallel_env_rate(env, steps: int) -> float:
    """A PettingZoo ParallelEnv stepped bare, resetting when its episode ends."""
    env.reset(seed=0)
    for agent in env.possible_agents:
        env.action_space(agent).seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        env.step({agent: env.action_space(agent).sample() for agent in env.agents})
        if not env.agents:
            env.reset()
    return steps / (time.perf_counter() - start)


def bare(target: str, **kwargs):
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)(**kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, one thread, "
          f"{args.steps} steps per row")
    print("| environment | path | B | env-steps/s | agent-steps/s |")
    print("|---|---|---:|---:|---:|")

    def row(label, path, num_envs, rate, n_agents):
        print(f"| {label} | {path} | {num_envs} | {rate:,.0f} | {rate * n_agents:,.0f} |", flush=True)

    external = [("mpe2_spread", "mpe2.simple_spread_v3:parallel_env", {}),
                ("multiwalker", "pettingzoo.sisl.multiwalker_v9:parallel_env", {}),
                ("pursuit", "pettingzoo.sisl.pursuit_v5:parallel_env", {"n_pursuers": 8, "n_evaders": 30})]
    for name, target, kwargs in external:
        env = bare(target, **kwargs)
        row(name, "PettingZoo, bare", 1, parallel_env_rate(env, args.steps), len(env.possible_agents))
        for num_envs, workers in ((1, 0), (8, 0), (8, args.workers)):
            rate, n_agents = vimarl_rate(name, num_envs, args.steps // (1 if num_envs == 1 else 4),
                                         num_workers=workers)
            row(name, f"adapter, {workers} workers" if workers else "adapter, in-process", num_envs, rate, n_agents)
    for num_envs in (1, 8):
        rate, n_agents = vimarl_rate("jungle", num_envs, args.steps)
        row("jungle", "MAgent2, in-process", num_envs, rate, n_agents)
    for name in ("spread", "coop_nav_n30"):
        rate, n_agents = vimarl_rate(name, 1, args.steps)
        row(name, "vimarl BatchedEnv", 1, rate, n_agents)
        wrapped = to_pettingzoo(name)
        row(name, "-> PettingZoo wrapper", 1, parallel_env_rate(wrapped, args.steps), len(wrapped.possible_agents))


if __name__ == "__main__":
    main()
