"""MAMT's update against MAAC's and MAMD's, and Eq. 14's counterfactual with and without the
attention critic's shortcut.

On rover_tower (N = 8 agents in two groups, 5 actions) and spread_n2, each algorithm with its
default config is built on 8 environments, a replay is filled with 40 vectorised steps of it
exploring, and one `update` on a batch of 128 is timed (the median of repeated calls after
warm-up, benchmarks/common.py: time_ms). "counterfactual" times Eq. 14's Q_i(a_\\j) for the same
batch: "stacked" is one critic forward over the factual rows and every copy
(`vimarl.algos.mamt.replaced_action_q`), "shortcut" `AttentionCritic.replaced_action_q`, which
MAMT uses; the last column is the largest difference between the two.

    python benchmarks/mamt_update.py [--threads T] [--quick]
"""

from __future__ import annotations

import torch

import vimarl
from common import parse_args, print_machine, print_table, time_ms
from vimarl.algos.mamt import counterfactual_actions, replaced_action_q
from vimarl.train import fill_replay

ENVS = ("rover_tower", "spread_n2")
ALGOS = ("maac", "mamd", "mamt")
BATCH, ENVS_B, STEPS = 128, 8, 40


def counterfactual_inputs(algo, batch):
    """(critic, obs, actions, replacements, weights, present) as MAMT's update builds them."""
    obs, actions = algo.joint_obs(batch.obs), algo.joint_actions(batch.action)
    with torch.no_grad():
        _, policy = algo.distribution(algo.policy, obs, algo.joint_action_mask(batch.action_mask, obs.shape[:-2]))
    policy = policy if algo.continuous else policy.probs
    return (algo.critic, obs, actions, *counterfactual_actions(policy, algo.config.counterfactual,
                                                               algo.config.counterfactual_samples),
            batch.joint_alive(algo.groups))


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    slow = (1, 3) if args.quick else (3, 15)
    print_machine()
    update_rows, counterfactual_rows = [], []
    for env_name in ENVS:
        times = {}
        for name in ALGOS:
            torch.manual_seed(0)
            env = vimarl.make_env(env_name, ENVS_B, seed=0)
            algo = vimarl.make_algo(name, env)
            codec, buffer = fill_replay(env, algo, STEPS)
            batch = codec.decode(buffer.sample(BATCH))
            times[name] = time_ms(lambda: algo.update(batch), *slow)
            if name == "mamt":
                critic, *inputs = counterfactual_inputs(algo, batch)
                critic.eval()
                stacked = time_ms(lambda: replaced_action_q(critic, *inputs), *slow)
                shortcut = time_ms(lambda: critic.replaced_action_q(*inputs), *slow)
                difference = (replaced_action_q(critic, *inputs)[1] - critic.replaced_action_q(*inputs)[1]).abs().max()
                counterfactual_rows.append([env_name, f"{stacked:.1f}", f"{shortcut:.1f}", f"{stacked / shortcut:.1f}x",
                                            f"{float(difference):.1e}"])
        update_rows.append([env_name, *(f"{times[name]:.1f}" for name in ALGOS), f"{times['mamt'] / times['maac']:.2f}x"])
    print(f"One update, batch {BATCH}, ms\n")
    print_table(["env", *ALGOS, "mamt / maac"], update_rows)
    print("Eq. 14's counterfactual on the same batch, ms\n")
    print_table(["env", "stacked forward", "shortcut", "speed-up", "max |difference|"], counterfactual_rows)


if __name__ == "__main__":
    main()
