"""Mixed teams: an algorithm or a frozen trained policy per group (vimarl/algos/team.py)."""

import copy
import math

import pytest
import torch

import vimarl
from vimarl.errors import VimarlError
from vimarl.logging import read_metrics
from vimarl.nn.centralized import CRITIC_ACTION
from vimarl.checkpoint import load_trained
from vimarl.train import act, fill_replay

QUICK = dict(total_steps=200, warmup_steps=100, update_every=25, batch_size=16, eval_every=200,
             eval_episodes=2, progress=False, tensorboard=False)


def tag_team(**config):
    env = vimarl.make_env("tag", 2, seed=0)
    return env, vimarl.make_algo("team", env, **config)


def changed_keys(before, after):
    return {k for k, v in after.items() if isinstance(v, torch.Tensor) and not torch.equal(v, before[k])}


def test_members_act_for_their_groups_and_update_separately():
    env, team = tag_team(members={"predators": "vpp", "prey": "isac"})
    assert {name: sorted(a.groups) for name, a in team.learners.items()} == {"vpp": ["predators"], "isac": ["prey"]}
    actions = act(team, env.reset(seed=0), explore=True)
    assert actions["predators"].shape == (2, 3) and actions["prey"].shape == (2, 1)
    codec, buffer = fill_replay(env, team, 30, capacity=200)
    before = copy.deepcopy(team.state_dict())
    metrics = team.update(codec.decode(buffer.sample(16)))
    assert {k.split("/")[0] for k in metrics} == {"vpp", "isac"}
    changed = changed_keys(before, team.state_dict())
    for name in ("vpp", "isac"):
        assert any(k.startswith(f"learners.{name}.policy.") for k in changed), name
        assert any(k.startswith(f"learners.{name}.critics.") for k in changed), name


def test_unlisted_groups_go_to_the_default_algorithm():
    _, team = tag_team()
    assert list(team.learners) == ["vpp"] and sorted(team.learners["vpp"].groups) == ["predators", "prey"]
    _, team = tag_team(members={"prey": "isac"}, default="vpp")
    assert sorted(team.learners["vpp"].groups) == ["predators"] and list(team.learners["isac"].groups) == ["prey"]


def test_member_configs_reach_the_member():
    _, team = tag_team(members={"predators": "vpp", "prey": "isac"}, configs={"vpp": {"lr": 0.0005}})
    assert team.learners["vpp"].config.lr == 0.0005 and team.learners["isac"].config.lr == 0.01


def test_frozen_policy_acts_like_the_trained_run_and_never_changes(tmp_path):
    trained_dir = tmp_path / "prey-run"
    vimarl.train("vpp", "tag", out=str(trained_dir), seed=3, **QUICK)
    _, trained, _ = load_trained(trained_dir)
    env, team = tag_team(members={"predators": "isac"}, frozen={"prey": str(trained_dir)})
    step = env.reset(seed=0)
    expected = act(trained, step, explore=False)["prey"]
    assert torch.equal(act(team, step, explore=False)["prey"], expected)
    codec, buffer = fill_replay(env, team, 30, capacity=200)
    before = copy.deepcopy(team.state_dict())
    team.train()
    team.update(codec.decode(buffer.sample(16)))
    changed = changed_keys(before, team.state_dict())
    assert changed and not any(k.startswith("frozen_members.") for k in changed)
    assert all(k.startswith("learners.isac.") for k in changed)
    assert not team.frozen_members.training


@pytest.mark.parametrize("config, message", [
    (dict(members={"predator": "vpp"}), "did you mean 'predators'"),
    (dict(members={"prey": "vpp"}, frozen={"prey": "x"}), "both to an algorithm and to a frozen policy"),
    (dict(members={"prey": "vpp"}, default=""), "without a policy"),
    (dict(members={"prey": "isac"}, configs={"masac": {"lr": 1}}), "no member uses"),
    (dict(members={"prey": "vppp"}), "unknown algorithm"),
    (dict(members={"prey": "vpp"}, configs={"vpp": {"lrr": 1}}), "unknown key 'algo.configs.vpp.lrr'"),
])
def test_bad_team_configs_are_one_line_errors(config, message):
    with pytest.raises(VimarlError, match=message) as error:
        tag_team(**config)
    assert "\n" not in str(error.value)


def test_frozen_run_that_lacks_the_group_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "grid"
    vimarl.train("vpp", "grid_coordination", out=str(run_dir), **QUICK)
    with pytest.raises(VimarlError, match="does not control group 'prey'"):
        tag_team(members={"predators": "vpp"}, frozen={"prey": str(run_dir)})


def test_team_trains_from_the_command_line_syntax_and_logs_each_group(tmp_path):
    out = tmp_path / "team"
    vimarl.train("team", "tag", out=str(out), algo_config={"members": "{predators: vpp, prey: isac}"}, **QUICK)
    row = read_metrics(out / "metrics.csv")[-1]
    assert {"eval_return/predators", "eval_return/prey", "vpp/loss_q", "isac/loss_q"} <= set(row)
    run, team, _ = load_trained(out)
    assert run.algo_config.members == {"predators": "vpp", "prey": "isac"}
    assert sorted(team.learners) == ["isac", "vpp"]


def test_masac_cooperators_against_a_maddpg_adversary_smoke():
    """003 Fig. 2 set-up on physical deception: cooperators by MA-SAC, the adversary by MADDPG."""
    env = vimarl.make_env("adversary", 2, seed=0)
    team = vimarl.make_algo("team", env, members={"agents": "masac", "adversary": "maddpg"},
                            configs={"masac": {"alpha": 0.01}})
    assert team.learners["masac"].config.alpha == 0.01
    codec, buffer = fill_replay(env, team, 30, capacity=200)
    before = copy.deepcopy(team.state_dict())
    metrics = team.update(codec.decode(buffer.sample(16)))
    assert {"masac/loss_q", "maddpg/loss_q"} <= set(metrics) and all(torch.isfinite(v) for v in metrics.values())
    changed = changed_keys(before, team.state_dict())
    assert any(k.startswith("learners.masac.policy.") for k in changed)
    assert any(k.startswith("learners.maddpg.policy.") for k in changed)


ARMS = [{"predators": "masac", "prey": "maddpg"}, {"predators": "maddpg", "prey": "maddpg"}]


@pytest.mark.parametrize("env_name, arms", [
    ("tag", ARMS),
    ("adversary", [{"agents": "masac", "adversary": "maddpg"}, {"agents": "maddpg", "adversary": "maddpg"}]),
])
def test_every_team_critic_reads_every_agent(env_name, arms):
    """003's Q_i(s, a) over all agents: both arms' critics have the same, full input width."""
    env = vimarl.make_env(env_name, 2)
    every_agent = sum(s.n_agents * (s.obs_dim + s.action_space.n) for s in env.groups.values())
    for members in arms:
        team = vimarl.make_algo("team", env, members=members)
        widths = team.critic_input_dims()
        assert set(widths) == set(members.values()) and set(widths.values()) == {every_agent}, members


class FixedPolicy(torch.nn.Module):
    """A hand-made target actor: logits that put all the mass on action 2."""

    def forward(self, obs):
        return torch.full((*obs.shape[:-1], 5), -1e4).index_fill(-1, torch.tensor([2]), 1e4)


def test_the_look_ahead_uses_the_other_members_target_policy():
    env, team = tag_team(members=ARMS[0])
    codec, buffer = fill_replay(env, team, 10, capacity=200)
    batch = codec.decode(buffer.sample(8))
    masac, maddpg = team.learners["masac"], team.learners["maddpg"]
    maddpg.target_policy["prey"] = FixedPolicy()
    seen = []
    masac.critics.target_q[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    masac.q_target(batch)
    prey_action = seen[0][..., -5:]  # the last agent's action block: the prey's, groups in env order
    assert torch.allclose(prey_action, torch.nn.functional.one_hot(torch.tensor(2), 5).float().expand_as(prey_action))
    assert seen[0].shape == (8, 3, masac.critic_input_dim)  # a row per predator, every agent in the input
    # MADDPG's critic reads the predators' replayed actions in L_Q: as stored (one-hots for MA-SAC).
    assert "predators" not in batch.extra.get(CRITIC_ACTION, {}) and "prey" in batch.extra[CRITIC_ACTION]


def test_team_stores_its_maddpg_members_soft_samples():
    env, team = tag_team(members=ARMS[0])
    step = env.reset(seed=0)
    actions = act(team, step, explore=True)
    stored = team.replay_values(actions)[CRITIC_ACTION]
    assert set(stored) == {"prey"} and torch.equal(stored["prey"].argmax(-1), actions["prey"])
    assert torch.equal(stored["prey"], team.learners["maddpg"].acted_samples["prey"][1])


def test_masac_against_maddpg_on_tag_learns_and_resumes(tmp_path):
    out = str(tmp_path / "run")
    run = vimarl.train("team", "tag", total_steps=600, warmup_steps=200, batch_size=32, save_buffer=True,
                       algo_config={"members": ARMS[0]}, out=out, progress=False, tensorboard=False)
    rows = read_metrics(run / "metrics.csv")
    for metric in ("masac/loss_q", "maddpg/loss_q"):
        assert any(math.isfinite(row.get(metric, math.nan)) for row in rows), metric
    vimarl.train(resume=run, total_steps=800)
    assert max(float(row["env_steps"]) for row in read_metrics(run / "metrics.csv")) >= 800
