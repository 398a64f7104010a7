"""Paper 002 App. A, Fig. 9 and 10: greedy learning of W^1, W^2 in the "two agents meet" toy, and the
execution trajectories with z sampled and with z = E[z]. Prints the final W and the meeting steps,
and writes one figure (W curves of both agents, both trajectories).

    python benchmarks/vm3ac_app_a.py [--steps 20000] [--seed 0] [--out docs/results/vm3ac_app_a.png]
"""

from __future__ import annotations

import argparse

import matplotlib
import torch

from vimarl.envs.toy.two_agents_meet import TwoAgentsMeetConfig, learn_meeting_weights, play

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/results/vm3ac_app_a.png")
    options = parser.parse_args()
    torch.set_num_threads(1)
    config = TwoAgentsMeetConfig()
    policy, history = learn_meeting_weights(options.steps, seed=options.seed, config=config)
    figure, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for agent in range(2):
        print(f"W^{agent + 1} after {options.steps} steps: {policy.W[agent].detach().numpy().round(3).tolist()}")
        for row in range(2):
            for col in range(2):
                axes[agent].plot(history[:, agent, row, col], label=f"w{row + 1}{col + 1}")
        axes[agent].set(title=f"Fig. 9: W^{agent + 1} of agent {agent + 1}", xlabel="Adam step")
        axes[agent].legend()
    for panel, z_mean in ((2, False), (3, True)):
        path = play(policy, z_mean, config, seed=options.seed)
        met = len(path) - 1 < config.episode_length
        name = "z = E[z] = (0.05, 0.05)" if z_mean else "z ~ Unif[0, 0.1]^2"
        print(f"execution with {name}: {'met' if met else 'did not meet'} after {len(path) - 1} steps, "
              f"final distance {(path[-1, 0] - path[-1, 1]).norm():.3f}")
        for agent in range(2):
            axes[panel].plot(path[:, agent, 0], path[:, agent, 1], marker=".", label=f"agent {agent + 1}")
        axes[panel].set(title=f"Fig. 10: {name}", xlabel="x", ylabel="y")
        axes[panel].legend()
    figure.tight_layout()
    figure.savefig(options.out, dpi=90)
    print(f"figure: {options.out}")


if __name__ == "__main__":
    main()
