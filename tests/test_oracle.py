"""The coop_nav oracle (vimarl.envs.particle.controllers) and the scripted-policy dispatch."""

import itertools
import json

import pytest
import torch

from vimarl.algos.base import UniformPolicy
from vimarl.envs.controllers import SCRIPTED_POLICIES, scripted_policy
from vimarl.envs.particle.controllers import CoopNavOracle, optimal_assignment
from vimarl.envs.registry import make_env
from vimarl.errors import VimarlError
from vimarl.train import FINAL_EVAL_SEED, act, evaluate


def test_assignment_is_the_optimal_permutation_on_a_hand_made_layout():
    # Both agents are nearest landmark 0, but the least total distance sends agent 0 to landmark 1:
    # 2.0 + 0.5 = 2.5 against 1.0 + 3.5 = 4.5.
    agents = torch.tensor([[[0.0, 0.0], [1.5, 0.0]]])
    landmarks = torch.tensor([[[1.0, 0.0], [-2.0, 0.0]]])
    assert optimal_assignment(agents, landmarks).tolist() == [[1, 0]]


def test_assignment_matches_brute_force_in_every_batch_element():
    generator = torch.Generator().manual_seed(0)
    agents, landmarks = torch.rand(4, 5, 2, generator=generator), torch.rand(4, 5, 2, generator=generator)
    assignment = optimal_assignment(agents, landmarks)
    for b in range(4):
        assert sorted(assignment[b].tolist()) == list(range(5))  # a permutation
        cost = torch.cdist(agents[b], landmarks[b])
        best = min(sum(cost[i, p[i]] for i in range(5)) for p in itertools.permutations(range(5)))
        assert sum(cost[i, assignment[b, i]] for i in range(5)) == pytest.approx(float(best), abs=1e-5)


# Measured (seed 0, 20 episodes, 2026-12-04): coop_nav_n6 oracle -232.4, uniform -661.7;
# coop_nav_n15 oracle -1031.8, uniform -3781.6. The margins are about half the gaps.
@pytest.mark.parametrize("name, margin", [("coop_nav_n6", 200.0), ("coop_nav_n15", 1400.0)])
def test_oracle_returns_are_far_above_uniform_random(name, margin):
    env = make_env(name, 20, seed=0)
    oracle = evaluate(CoopNavOracle(env), env, seed=0)["agents"].mean().item()
    uniform = evaluate(UniformPolicy(env.groups, 0), env, seed=0)["agents"].mean().item()
    assert oracle > uniform + margin


def final_distances(name: str, episodes: int = 20, **config) -> tuple[torch.Tensor, torch.Tensor]:
    """Each agent's distance [B, N] to its assigned landmark at the end of an episode, and the
    assigned landmark indices [B, N]."""
    env = make_env(name, episodes, seed=0, **config)
    n, oracle = env.config.n_agents, CoopNavOracle(env)
    with oracle.execution():
        step = env.reset(seed=0)
        state = step.state
        for _ in range(env.max_steps):
            step = env.step(act(oracle, step, explore=False))
    position = state[:, :4 * n].view(-1, 2 * n, 2)
    index = optimal_assignment(position[:, :n], position[:, n:])
    final = step.info["final_state"][:, :4 * n].view(-1, 2 * n, 2)
    targets = final[:, n:].gather(1, index.unsqueeze(-1).expand(-1, -1, 2))
    return (final[:, :n] - targets).norm(dim=-1), index


def test_each_landmark_ends_with_its_own_agent_on_it():
    # Measured (seed 0, 20 episodes): at N = 6 every agent ends within 0.15 of its landmark
    # (median 0.04); at N = 15, 297 of 300 do (18 of 20 episodes fully covered): an agent that
    # starts about 4 away cannot arrive in 25 steps, and one blocked head-on by a settled agent
    # stays stuck (collisions are not avoided).
    distance, index = final_distances("coop_nav_n6")
    assert (index.sort(-1).values == torch.arange(6)).all()  # one agent per landmark
    assert distance.max() < 0.15 and distance.median() < 0.06
    distance, index = final_distances("coop_nav_n15")
    assert (index.sort(-1).values == torch.arange(15)).all()
    assert (distance < 0.15).float().mean() > 0.97 and (distance < 0.15).all(-1).float().mean() >= 0.8


def test_the_oracle_reassigns_at_every_reset():
    env = make_env("coop_nav_n6", 3, seed=0, episode_length=4)
    oracle = CoopNavOracle(env)
    with oracle.execution():
        step = env.reset(seed=0)
        for episode in range(3):
            for t in range(env.max_steps):
                landmarks = step.state[:, 12:24].view(3, 6, 2)
                step = env.step(act(oracle, step, explore=False))
                if t == 0:
                    targets = oracle.targets.clone()
                # the assignment made at the episode's first step holds for the whole episode
                assert torch.equal(oracle.landmarks, landmarks) and torch.equal(oracle.targets, targets)
            first = step.state[:, :24].view(3, 12, 2)  # the next episode's first state (auto-reset)
            act(oracle, step, explore=False)
            index = optimal_assignment(first[:, :6], first[:, 6:])
            expected = first[:, 6:].gather(1, index.unsqueeze(-1).expand(-1, -1, 2))
            assert torch.equal(oracle.targets, expected)


@pytest.mark.parametrize("name, config", [
    ("coop_nav_n6", {"reward": "local"}),
    ("coop_nav_n6", {"action_mode": "continuous"}),
    ("coop_nav_n15", {"reward": "local", "action_mode": "continuous"}),
    ("coop_nav_n30", {}),
    ("coop_nav_n200", {}),
])
def test_the_oracle_beats_random_on_every_variant(name, config):
    # Measured (seed 0, 2 episodes for N = 200, 4 otherwise), oracle vs uniform: n6 local -34.1 vs
    # -107.9; n6 continuous -159.7 vs -598.4; n15 local continuous -47.7 vs -254.8; n30 -3641.4 vs
    # -14062.0; n200 -196926.8 vs -577681.8: ratios 0.19 to 0.34.
    env = make_env(name, 2 if name == "coop_nav_n200" else 4, seed=0, **config)
    oracle = evaluate(CoopNavOracle(env), env, seed=0)["agents"].mean().item()
    uniform = evaluate(UniformPolicy(env.groups, 0), env, seed=0)["agents"].mean().item()
    assert oracle > 0.5 * uniform  # returns are negative: the oracle's is less than half as bad


def test_controllers_refuse_an_env_they_do_not_control_in_one_line():
    assert set(SCRIPTED_POLICIES) == {"fixed_time", "max_pressure", "oracle"}
    with pytest.raises(VimarlError) as error:
        scripted_policy("oracle", make_env("spread", 1))
    message = str(error.value)
    assert "\n" not in message and "env 'spread' is not a coop_nav env" in message and "coop_nav_n15" in message
    with pytest.raises(VimarlError, match="is not a traffic env") as error:
        scripted_policy("max_pressure", make_env("coop_nav_n6", 1))
    assert "\n" not in str(error.value)
    with pytest.raises(VimarlError, match="unknown policy 'orcale' \\(did you mean 'oracle'"):
        scripted_policy("orcale", make_env("coop_nav_n6", 1))


def test_vimarl_eval_runs_the_oracle(capsys, tmp_path):
    from vimarl.cli import main

    gif = tmp_path / "oracle.gif"
    assert main(["eval", "--policy", "oracle", "coop_nav_n6", "--episodes", "3", "--gif", str(gif)]) == 0
    result = json.loads(capsys.readouterr().out)
    env = make_env("coop_nav_n6", 3, FINAL_EVAL_SEED)
    returns = evaluate(CoopNavOracle(env), env, FINAL_EVAL_SEED)["agents"]
    assert result["policy"] == "oracle" and result["return_mean"] == pytest.approx(returns.double().mean().item())
    assert gif.read_bytes()[:6] == b"GIF89a"
    assert main(["eval", "--policy", "oracle", "spread"]) == 2
    assert "is not a coop_nav env" in capsys.readouterr().err
