"""Every registered environment honours the batched contract (DESIGN §3)."""

import importlib.util

import pytest
import torch

import vimarl
from vimarl.envs.registry import ENVIRONMENTS
from vimarl.train import act

# The generic PettingZoo entry needs env.env=module:function; its own tests cover it.
NAMES = sorted(n for n in ENVIRONMENTS if n != "pettingzoo")


def make_or_skip(name: str, seed: int):
    """The env with B = 2, or a skip naming the extra when its simulator is not installed."""
    extra = ENVIRONMENTS[name].requires
    module = {"magent": "magent2", "sisl": "pymunk", "mpe": "mpe2", "pettingzoo": "pettingzoo",
              "sumo": "libsumo"}.get(extra)
    if module and importlib.util.find_spec(module) is None:
        pytest.skip(f"{name} needs pip install 'vimarl[{extra}]'")
    missing = ENVIRONMENTS[name].missing_data()  # the real-city CityFlow maps are not bundled
    if missing:
        pytest.skip(f"{name} needs the CityFlow data: {missing}")
    # Short episodes for the external simulators (pursuit steps at about 90 env steps/s).
    short = {"episode_length": 30} if extra else {}
    return vimarl.make_env(name, 2, seed=seed, **short)


@pytest.mark.parametrize("name", NAMES)
def test_env_steps_through_an_auto_reset_with_consistent_tensors(name):
    env = make_or_skip(name, seed=1)
    step = env.reset(seed=1)
    generator = torch.Generator().manual_seed(0)
    learned = env.learned_groups()
    for _ in range(env.max_steps + 1):
        actions = {g: spec.action_space.sample((2, spec.n_agents), generator, env.device,
                                               step.groups[g].action_mask) for g, spec in learned.items()}
        step = env.step(actions)
        for group, spec in env.groups.items():
            data = step.groups[group]
            assert data.obs.shape == (2, spec.n_agents, spec.obs_dim) and torch.isfinite(data.obs).all()
            assert data.reward.shape == (2, spec.n_agents) and torch.isfinite(data.reward).all()
            if spec.graph_k is not None:
                assert data.graph.neighbors.shape == (2, spec.n_agents, spec.graph_k)
                assert ((data.graph.neighbors >= 0) & (data.graph.neighbors < spec.n_agents)).all()
        if env.state_dim:
            assert step.state.shape == (2, env.state_dim) and torch.isfinite(step.state).all()
    assert bool((env.episode_index >= 1).all()), "every sub-environment finished an episode"
    assert "final_obs" in step.info


@pytest.mark.parametrize("name", [n for n in NAMES if n != "coop_nav_n1225"])
def test_vpp_acts_on_every_env_and_every_learned_group(name):
    env = make_or_skip(name, seed=0)
    learned = {g: s for g, s in env.groups.items() if s.role == "learned"}
    algo = vimarl.make_algo("vpp", env)
    actions = act(algo, env.reset(seed=0), explore=True)
    assert set(actions) == set(learned)
    for group, spec in learned.items():
        assert actions[group].shape[:2] == (2, spec.n_agents)
