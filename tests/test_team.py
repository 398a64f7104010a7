"""Mixed teams: an algorithm or a frozen trained policy per group (vimarl/algos/team.py)."""

import copy

import pytest
import torch

import vimarl
from vimarl.errors import VimarlError
from vimarl.logging import read_metrics
from vimarl.train import act, fill_replay, load_trained

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
