"""The agent-graph ablation switches: `graph`, `graph_k`, `graph_every` of the particle worlds
and `graph` of the grid coordination game (VPP App. G, IP App. C.1)."""

from __future__ import annotations

import itertools

import pytest
import torch

from vimarl.config import parse_overrides, resolve
from vimarl.fields import field_docs
from vimarl.envs.graph import (
    Graph,
    counter_random_k_graph,
    knn_graph,
    random_k_graph_from_keys,
)
from vimarl.envs.particle.base import ParticleConfig
from vimarl.envs.registry import make_env
from vimarl.envs.toy.grid_coordination import GridCoordinationConfig
from vimarl.errors import VimarlError

torch.set_num_threads(1)


def no_op(env) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(env.num_envs, spec.n_agents, dtype=torch.int64)
            for name, spec in env.learned_groups().items()}


def random_actions(env, generator) -> dict[str, torch.Tensor]:
    return {name: spec.action_space.sample((env.num_envs, spec.n_agents), generator, "cpu")
            for name, spec in env.learned_groups().items()}


def rollout(env, steps: int, seed: int = 0, group: str = "agents", moves: bool = False):
    """The group's graphs and positions after reset(seed) and after each of `steps` steps."""
    generator = torch.Generator().manual_seed(0)
    step = env.reset(seed=seed)
    graphs, positions = [step.groups[group].graph], [env.world.position.clone()]
    for _ in range(steps):
        step = env.step(random_actions(env, generator) if moves else no_op(env))
        graphs.append(step.groups[group].graph)
        positions.append(env.world.position.clone())
    return graphs, positions


def same(a: Graph, b: Graph) -> bool:
    return torch.equal(a.neighbors, b.neighbors) and torch.equal(a.mask, b.mask)


def assert_k_distinct_others(graph: Graph, k: int) -> None:
    """Every agent has exactly k real neighbours, all distinct and none itself."""
    _, n, slots = graph.neighbors.shape
    assert slots == k and bool(graph.mask.all())
    agent = torch.arange(n).view(1, n, 1)
    assert not bool((graph.neighbors == agent).any())
    assert bool((graph.neighbors >= 0).all()) and bool((graph.neighbors < n).all())
    ordered = graph.neighbors.sort(dim=-1).values
    assert bool((ordered[..., 1:] != ordered[..., :-1]).all())


# -- configuration ---------------------------------------------------------------------------
def test_fields_are_documented_and_default_to_the_papers_graphs():
    assert {"graph", "graph_k", "graph_every"} <= set(field_docs(ParticleConfig))
    assert {"graph", "graph_k"} <= set(field_docs(GridCoordinationConfig))
    assert ParticleConfig().graph == "knn" and ParticleConfig().graph_every == 5
    assert GridCoordinationConfig().graph == "grid"


def test_cli_overrides_reach_the_env_config():
    run = resolve("vpp", "coop_nav_n3", parse_overrides(
        ["env.graph=random_k", "env.graph_k=2", "env.graph_every=1"]))
    assert (run.env_config.graph, run.env_config.graph_k, run.env_config.graph_every) == ("random_k", 2, 1)
    run = resolve("vpp", "grid_coordination", parse_overrides(["env.graph=complete"]))
    assert run.env_config.graph == "complete"
    with pytest.raises(VimarlError, match="knn, random_k, complete"):
        resolve("vpp", "coop_nav_n3", parse_overrides(["env.graph=grid"]))
    with pytest.raises(ValueError, match="graph_k"):
        GridCoordinationConfig(graph="random_k", graph_k=9)


# -- particle worlds -------------------------------------------------------------------------
def test_knn_default_is_knn_of_the_positions_at_each_refresh():
    env = make_env("coop_nav", num_envs=3, n_agents=8)
    assert env.config.graph == "knn" and env.groups["agents"].graph_k == 4
    graphs, positions = rollout(env, 11, moves=True)
    for t, graph in enumerate(graphs):
        refreshed = t - t % 5  # steps 0, 5, 10
        assert same(graph, knn_graph(positions[refreshed][:, :8], 4)), t
    # Agents moved, so at least one stale graph differs from the kNN of the current positions.
    assert any(not same(graphs[t], knn_graph(positions[t][:, :8], 4)) for t in (4, 9))


def test_knn_with_graph_every_1_follows_every_step():
    env = make_env("coop_nav", num_envs=3, n_agents=8, graph_every=1, graph_k=3)
    assert env.groups["agents"].graph_k == 3
    graphs, positions = rollout(env, 6, moves=True)
    for graph, position in zip(graphs, positions):
        assert same(graph, knn_graph(position[:, :8], 3))


def test_complete_graph_lists_every_other_agent_once():
    env = make_env("coop_nav", num_envs=2, n_agents=6, graph="complete", graph_k=2)
    assert env.groups["agents"].graph_k == 5  # graph_k is ignored
    graphs, _ = rollout(env, 7, moves=True)
    for graph in graphs:
        assert_k_distinct_others(graph, 5)  # 5 distinct others out of 5: each exactly once
        assert same(graph, graphs[0])


@pytest.mark.parametrize("graph", ["knn", "random_k", "complete"])
def test_group_spec_k_is_the_graph_k_in_every_group(graph):
    env = make_env("tag", num_envs=2, graph=graph)  # 3 predators, 1 prey
    step = env.reset(seed=0)
    step = env.step(no_op(env))
    for name, spec in env.groups.items():
        assert step.groups[name].graph.k == spec.graph_k == max(spec.n_agents - 1, 1)
    assert not bool(step.groups["prey"].graph.mask.any())  # a lone agent: padding only
    env = make_env("coop_nav", num_envs=2, n_agents=40, graph=graph)
    assert env.reset(seed=0).groups["agents"].graph.k == env.groups["agents"].graph_k == (
        39 if graph == "complete" else 8)


def test_random_k_draws_k_distinct_others_fixed_between_refreshes():
    env = make_env("coop_nav", num_envs=4, n_agents=8, graph="random_k", graph_k=3, episode_length=12)
    assert env.groups["agents"].graph_k == 3
    graphs, _ = rollout(env, 14)
    for graph in graphs:
        assert_k_distinct_others(graph, 3)
    for t in range(12):
        assert same(graphs[t], graphs[t - t % 5]), t  # fixed between refreshes
    assert not same(graphs[0], graphs[5]) and not same(graphs[5], graphs[10])
    # Step 12 ends the episode: the next one starts with a fresh draw.
    assert not same(graphs[12], graphs[0]) and not same(graphs[12], graphs[10])
    assert same(graphs[13], graphs[12])


def test_random_k_with_graph_every_1_redraws_every_step():
    env = make_env("coop_nav", num_envs=2, n_agents=8, graph="random_k", graph_k=3, graph_every=1)
    graphs, _ = rollout(env, 5)
    for before, after in itertools.pairwise(graphs):
        assert not same(before, after)


def test_random_k_keeps_the_final_graph_of_a_finished_episode():
    env = make_env("coop_nav", num_envs=2, n_agents=8, graph="random_k", graph_k=3, episode_length=3,
                   graph_every=1)
    env.reset(seed=0)
    for _ in range(2):
        before = env.step(no_op(env))
    step = env.step(no_op(env))  # the episode ends and restarts here
    final = step.info["final_graph"]["agents"]
    assert step.truncated.all() and not same(final, step.groups["agents"].graph)
    assert not same(final, before.groups["agents"].graph)  # graph_every=1: redrawn at step 3 too


def test_random_k_is_reproducible_and_independent_of_num_envs():
    small = make_env("coop_nav", num_envs=2, n_agents=8, graph="random_k", graph_k=3, episode_length=6)
    large = make_env("coop_nav", num_envs=5, n_agents=8, graph="random_k", graph_k=3, episode_length=6)
    first, _ = rollout(small, 13, seed=3)
    again, _ = rollout(small, 13, seed=3)
    wide, _ = rollout(large, 13, seed=3)
    other, _ = rollout(small, 13, seed=4)
    for a, b, c, d in zip(first, again, wide, other):
        assert same(a, b)
        assert same(a, c.index(torch.arange(2)))
        assert not same(a, d)
    # Sub-environments draw different graphs from each other.
    assert not same(first[0].index(torch.tensor([0])), first[0].index(torch.tensor([1])))


def test_counter_random_k_graph_is_a_pure_function_of_its_counters():
    env_ids, episodes = torch.tensor([0, 1, 2]), torch.tensor([4, 0, 7])
    graph = counter_random_k_graph(6, 2, 11, env_ids, episodes, 9)
    assert_k_distinct_others(graph, 2)
    alone = counter_random_k_graph(6, 2, 11, env_ids[2:], episodes[2:], 9)
    assert same(graph.index(torch.tensor([2])), alone)
    padded = counter_random_k_graph(3, 4, 11, env_ids, episodes, 9)  # only 2 others: 2 padding slots
    assert padded.k == 4 and bool((padded.degree() == 2).all())
    # Keys pick the others holding the largest values, largest first.
    keys = torch.tensor([[[0.1, 0.9, 0.5], [0.3, 0.2, 0.8], [0.7, 0.6, 0.4], [0.0, 0.5, 0.2]]])
    chosen = random_k_graph_from_keys(keys, 2).neighbors[0].tolist()
    assert chosen == [[2, 3], [3, 0], [0, 1], [1, 2]]


# -- grid coordination -----------------------------------------------------------------------
# 2 x 2 grid: agent 0 (top left) borders 1 and 2, agent 3 borders 1 and 2. With only agent 0
# picking 1, its two grid edges disagree: r = -1/2 * [2, 1, 1, 0]. The complete graph would
# have given agent 0 three disagreeing pairs and agent 3 one.
GRID_ACTIONS = [[1, 0, 0, 0], [1, 0, 0, 1], [1, 1, 1, 1]]
GRID_REWARDS = [[-1.0, -0.5, -0.5, 0.0], [-1.0, -1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("graph, k", [("grid", 4), ("complete", 3), ("random_k", 2)])
def test_grid_rewards_follow_the_grid_whatever_graph_the_agents_see(graph, k):
    env = make_env("grid_coordination", num_envs=3, n=2, graph=graph, graph_k=2)
    assert env.groups["agents"].graph_k == k
    env.reset(seed=0)
    step = env.step({"agents": torch.tensor(GRID_ACTIONS)})
    assert torch.equal(step.groups["agents"].reward, torch.tensor(GRID_REWARDS))
    assert step.groups["agents"].graph.k == k


def test_grid_complete_graph_and_3x3_rewards():
    env = make_env("grid_coordination", num_envs=1, graph="complete")
    assert env.groups["agents"].graph_k == 8
    graph = env.reset(seed=0).groups["agents"].graph
    assert_k_distinct_others(graph, 8)
    # Only the centre picks 1: its 4 grid edges disagree, the corners see nothing.
    step = env.step({"agents": torch.tensor([[0, 0, 0, 0, 1, 0, 0, 0, 0]])})
    expected = torch.tensor([[0.0, -0.5, 0.0, -0.5, -2.0, -0.5, 0.0, -0.5, 0.0]])
    assert torch.equal(step.groups["agents"].reward, expected)


def test_grid_random_k_draws_once_per_episode_reproducibly():
    env = make_env("grid_coordination", num_envs=2, graph="random_k", graph_k=3)
    wide = make_env("grid_coordination", num_envs=4, graph="random_k", graph_k=3)
    actions = {"agents": torch.zeros(2, 9, dtype=torch.int64)}
    wide_actions = {"agents": torch.zeros(4, 9, dtype=torch.int64)}
    graphs, wide_graphs = [env.reset(seed=5).groups["agents"].graph], [wide.reset(seed=5).groups["agents"].graph]
    for _ in range(3):
        step = env.step(actions)
        # The step ends the episode: the final graph is the one the episode was played on.
        assert same(step.info["final_graph"]["agents"], graphs[-1])
        graphs.append(step.groups["agents"].graph)
        wide_graphs.append(wide.step(wide_actions).groups["agents"].graph)
    for graph, wide_graph in zip(graphs, wide_graphs):
        assert_k_distinct_others(graph, 3)
        assert same(graph, wide_graph.index(torch.arange(2)))
    for before, after in itertools.pairwise(graphs):
        assert not same(before, after)
    assert same(env.reset(seed=5).groups["agents"].graph, graphs[0])


@pytest.mark.parametrize("graph", ["knn", "random_k"])
def test_state_dict_restores_the_graph_between_refreshes(graph):
    """Restored at step 7, between the refreshes at 5 and 10, a copy sees the same graphs."""
    original = make_env("coop_nav", num_envs=2, n_agents=8, graph=graph)
    copy = make_env("coop_nav", num_envs=2, n_agents=8, graph=graph)
    generator = torch.Generator().manual_seed(0)
    original.reset(seed=0)
    copy.reset(seed=1)
    for _ in range(7):
        original.step(random_actions(original, generator))
    copy.load_state_dict(original.state_dict())
    for _ in range(5):
        actions = random_actions(original, generator)
        assert same(original.step(actions).groups["agents"].graph, copy.step(actions).groups["agents"].graph)
    state = original.state_dict()
    del state["graphs"]  # a checkpoint without graphs: random_k redraws the same, knn rebuilds
    copy.load_state_dict(state)
    if graph == "random_k":
        actions = random_actions(original, generator)
        assert same(original.step(actions).groups["agents"].graph, copy.step(actions).groups["agents"].graph)
