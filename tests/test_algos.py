"""Every registered algorithm: acting, updating, checkpointing its optimisers, capability checks."""

import copy

import pytest
import torch

import vimarl
from vimarl.algos import ALGORITHMS, Algorithm, Capabilities
from vimarl.envs.base import Box, Discrete, GroupSpec
from vimarl.errors import VimarlError
from vimarl.nn.distributions import action_features
from vimarl.train import act, fill_replay

from helpers import assert_same_state
from toy_envs import register_test_envs

register_test_envs()
ENVS = ["grid_coordination", "test_continuous_consensus"]


def training_batch(env, algo):
    """What the trainer hands `update`: 32 replayed transitions, or one whole rollout of an
    on-policy algorithm (time-major)."""
    sampler = algo.sampler
    codec, buffer = fill_replay(env, algo, sampler.length if sampler.kind == "rollout" else 20, capacity=1000)
    return codec.decode(buffer.draw(sampler, 32))


def compatible(algo_name, env_name):
    caps = ALGORITHMS[algo_name].capabilities
    return caps.continuous if env_name == "test_continuous_consensus" else caps.discrete


CASES = [(a, e) for a in sorted(ALGORITHMS) for e in ENVS if compatible(a, e)]


@pytest.mark.parametrize("algo_name, env_name", CASES)
def test_act_gives_valid_actions(algo_name, env_name):
    env = vimarl.make_env(env_name, 4)
    algo = vimarl.make_algo(algo_name, env)
    step = env.reset(seed=0)
    spec = env.groups["agents"]
    for explore in (True, False):
        action = act(algo, step, explore=explore)["agents"]
        if isinstance(spec.action_space, Discrete):
            assert action.dtype == torch.int64 and action.shape == (4, spec.n_agents)
            assert ((action >= 0) & (action < spec.action_space.n)).all()
        else:
            assert action.shape == (4, spec.n_agents, spec.action_space.dim)
            assert ((action >= -1) & (action <= 1)).all()
    assert torch.equal(act(algo, step, explore=False)["agents"], act(algo, step, explore=False)["agents"])


@pytest.mark.parametrize("algo_name, env_name", CASES)
def test_update_changes_parameters_and_reports_finite_metrics(algo_name, env_name):
    env = vimarl.make_env(env_name, 4)
    algo = vimarl.make_algo(algo_name, env)
    batch = training_batch(env, algo)
    before = copy.deepcopy(algo.state_dict())
    metrics = algo.update(batch)
    assert metrics and all(torch.isfinite(v) and v.dim() == 0 for v in metrics.values())
    changed = [k for k, v in algo.state_dict().items()
               if isinstance(v, torch.Tensor) and not torch.equal(v, before[k])]
    # The policy (or, in one network with two heads as NeurComm's, its actor) and a critic (Q, or a V) both learned.
    assert any("policy." in k or ".actor." in k for k in changed) and any("critic" in k for k in changed)


@pytest.mark.parametrize("algo_name", sorted(ALGORITHMS))
def test_state_dict_carries_optimiser_state_for_exact_continuation(algo_name):
    env = vimarl.make_env("grid_coordination", 4)
    first = vimarl.make_algo(algo_name, env)
    batch = training_batch(env, first)
    for _ in range(3):
        first.update(batch)
    second = vimarl.make_algo(algo_name, env)
    second.load_state_dict(first.state_dict())
    def moments(algo):
        return [optimizer.state_dict()["state"] for module in algo.modules() if isinstance(module, Algorithm)
                for optimizer in module.optimizers.values()]
    # Every optimiser's state comes back (plain SGD, as LOLA's policy steps, has none to carry).
    assert any(moments(second)), "Adam moments were not restored"
    assert [state.keys() for state in moments(second)] == [state.keys() for state in moments(first)]
    torch.manual_seed(1)
    first.update(batch)
    torch.manual_seed(1)
    second.update(batch)
    assert_same_state(first, second)


def test_vpp_q_loss_is_eq8_with_target_v():
    env = vimarl.make_env("grid_coordination", 4)
    algo = vimarl.make_algo("vpp", env, gamma=0.9)
    codec, buffer = fill_replay(env, algo, 20, capacity=1000)
    batch = codec.decode(buffer.sample(16))
    batch.terminated[:8] = 0.0  # bootstrapped half: r + gamma V_target(s')
    g = "agents"
    with torch.no_grad():
        next_v = algo.critics["agents"].target_value(batch.next_obs[g], batch.next_graph[g])
        target = batch.reward[g] + 0.9 * (1 - batch.terminated).unsqueeze(-1) * next_v
        q = algo.critics["agents"].q[0](batch.obs[g], action_features(batch.action[g], Discrete(2)), batch.graph[g])
        expected = 0.5 * (q - target).square().mean()
    assert torch.allclose(algo.update(batch)["loss_q"], expected, atol=1e-6)


def test_target_value_follows_polyak():
    env = vimarl.make_env("grid_coordination", 4)
    algo = vimarl.make_algo("vpp", env, tau=0.25)
    codec, buffer = fill_replay(env, algo, 20, capacity=1000)
    target_before = copy.deepcopy(algo.critics["agents"].target_value.state_dict())
    algo.update(codec.decode(buffer.sample(16)))
    value_after = algo.critics["agents"].value.state_dict()
    for name, old in target_before.items():
        expected = 0.75 * old + 0.25 * value_after[name]
        assert torch.allclose(algo.critics["agents"].target_value.state_dict()[name], expected, atol=1e-6)


def test_isac_policy_ignores_neighbours_and_vpp_does_not():
    env = vimarl.make_env("grid_coordination", 1, agent_ids=True)
    step = env.reset(seed=0)
    obs, graph = step.groups["agents"].obs, step.groups["agents"].graph
    changed = obs.clone()
    changed[0, 1, 0] = 5.0  # agent 1 is a neighbour of agent 0
    for name, should_change in (("isac", False), ("vpp", True)):
        policy = vimarl.make_algo(name, env).policy
        before = policy("agents", obs, graph).logits[0, 0]
        after = policy("agents", changed, graph).logits[0, 0]
        assert (not torch.allclose(before, after)) == should_change, name


class DiscreteOnly(Algorithm):
    Config = object
    capabilities = Capabilities(discrete=True, continuous=False, needs_state=True)
    name = "discrete_only"

    def act(self, obs, graph, *, explore, action_mask=None, state=None):
        return {}

    def update(self, batch):
        return {}


def test_capability_checks_are_one_line_errors():
    box = {"agents": GroupSpec(2, 3, Box(-1, 1, 2), graph_k=1)}
    with pytest.raises(VimarlError) as error:
        DiscreteOnly.check_env("spread", box, state_dim=4)
    assert "cannot handle continuous actions" in str(error.value) and "\n" not in str(error.value)
    discrete = {"agents": GroupSpec(2, 3, Discrete(5), graph_k=1)}
    with pytest.raises(VimarlError, match="needs a global state"):
        DiscreteOnly.check_env("spread", discrete, state_dim=0)
    no_graph = {"agents": GroupSpec(2, 3, Discrete(5))}
    with pytest.raises(VimarlError, match="needs an agent graph"):
        ALGORITHMS["vpp"].check_env("x", no_graph, state_dim=0)
    two_groups = {"a": discrete["agents"], "b": discrete["agents"]}
    with pytest.raises(VimarlError, match="heterogeneous"):
        DiscreteOnly.check_env("x", two_groups, state_dim=4)
