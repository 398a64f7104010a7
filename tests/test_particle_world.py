"""Batched MPE physics (vimarl/envs/particle/world.py) against hand-computed cases."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import vimarl
from vimarl.envs.graph import knn_graph
from vimarl.envs.particle.world import PhysicsOptions, World, decode_actions
from vimarl.envs.spatial import cell_candidates


def one_agent(integration, **kwargs):
    return World(1, size=[0.15], movable=[True], collide=[False], n_agents=1,
                 options=PhysicsOptions(integration=integration), **kwargs)


def test_original_mpe_closed_form():
    """ENV_SPECS §0.1: with no accel and mass 1, v' = 0.75 v + 0.5 u and p' = p + 0.1 v'."""
    world = one_agent("mpe")
    world.velocity[0, 0] = torch.tensor([0.4, -0.2])
    world.step(world.action_force(torch.tensor([[[1.0, 0.0]]])))
    v = torch.tensor([0.75 * 0.4 + 0.5, 0.75 * -0.2])
    assert torch.allclose(world.velocity[0, 0], v)
    assert torch.allclose(world.position[0, 0], 0.1 * v)


def test_mpe2_moves_with_the_old_velocity_first():
    world = one_agent("mpe2")
    world.velocity[0, 0] = torch.tensor([0.4, -0.2])
    world.step(world.action_force(torch.tensor([[[1.0, 0.0]]])))
    assert torch.allclose(world.position[0, 0], torch.tensor([0.04, -0.02]))
    assert torch.allclose(world.velocity[0, 0], torch.tensor([0.8, -0.15]))


def test_terminal_speed_under_constant_push_is_two():
    world = one_agent("mpe")
    for _ in range(200):
        world.step(world.action_force(torch.tensor([[[1.0, 1.0]]])))
    assert torch.allclose(world.velocity[0, 0], torch.tensor([2.0, 2.0]), atol=1e-5)


def test_max_speed_and_accel():
    world = one_agent("mpe", accel=[3.0], max_speed=[1.0])
    world.step(world.action_force(torch.tensor([[[1.0, 0.0]]])))  # 3 * 0.1 = 0.3 < 1
    assert torch.allclose(world.velocity[0, 0], torch.tensor([0.3, 0.0]))
    for _ in range(20):
        world.step(world.action_force(torch.tensor([[[1.0, 1.0]]])))
    assert torch.allclose(world.velocity[0, 0].norm(), torch.tensor(1.0))


def reference_contact(p_a, p_b, size_a, size_b, force=100.0, margin=1e-3):
    delta = p_a - p_b
    dist = np.sqrt(np.sum(np.square(delta)))
    penetration = np.logaddexp(0, -(dist - (size_a + size_b)) / margin) * margin
    return force * delta / dist * penetration


def test_contact_force_matches_mpe_formula_and_respects_movable_and_collide():
    world = World(1, size=[0.15, 0.1, 0.2, 0.3], movable=[True, True, False, True],
                  collide=[True, True, True, False], n_agents=2)
    world.position[0] = torch.tensor([[0.0, 0.0], [0.2, 0.05], [-0.3, 0.0], [0.05, 0.05]])
    forces = world.contact_forces()[0].double().numpy()  # colliders 0, 1, 2
    p = world.position[0].double().numpy()
    f01, f02 = reference_contact(p[0], p[1], 0.15, 0.1), reference_contact(p[0], p[2], 0.15, 0.2)
    f12 = reference_contact(p[1], p[2], 0.1, 0.2)
    np.testing.assert_allclose(forces[0], f01 + f02, rtol=1e-5)
    np.testing.assert_allclose(forces[1], -f01 + f12, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(forces[2], [0.0, 0.0])  # immovable: computed, never applied


def test_pic_single_contact_radius():
    """PIC's vectorised core pushes every pair apart at 2 * size of agent 0 (ENV_SPECS §0.2)."""
    sizes = [0.1, 0.05]
    position = torch.tensor([[[0.0, 0.0], [0.17, 0.0]]])
    pairwise = World(1, size=sizes, movable=[True, True], collide=[True, True], n_agents=2)
    pic = World(1, size=sizes, movable=[True, True], collide=[True, True], n_agents=2,
                options=PhysicsOptions(contact_radius="first_agent"))
    pairwise.position, pic.position = position.clone(), position.clone()
    assert pairwise.contact_forces().abs().max() < 1e-6  # 0.17 > 0.15: apart
    expected = reference_contact(np.array([0.0, 0.0]), np.array([0.17, 0.0]), 0.1, 0.1)
    np.testing.assert_allclose(pic.contact_forces()[0, 0].numpy(), expected, rtol=1e-5)


def test_maac_mass_weighting_and_squared_accel():
    """MAAC's fork: force on a scaled by m_b / m_a; action force mass * accel * u * accel."""
    world = World(1, size=[0.1, 0.1], movable=[True, True], collide=[True, True], n_agents=2,
                  mass=[1.0, 3.0], accel=[1.5, None],
                  options=PhysicsOptions(mass_weighted_contact=True, action_force="maac"))
    world.position[0] = torch.tensor([[0.0, 0.0], [0.15, 0.0]])
    force = world.contact_forces()[0]
    base = reference_contact(np.zeros(2), np.array([0.15, 0.0]), 0.1, 0.1)
    np.testing.assert_allclose(force[0].numpy(), 3.0 * base, rtol=1e-5)
    np.testing.assert_allclose(force[1].numpy(), -base / 3.0, rtol=1e-5)
    action = world.action_force(torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]))
    acceleration = action[0] / world.mass[:2].unsqueeze(-1)
    assert torch.allclose(acceleration[:, 0], torch.tensor([1.5 ** 2, 5.0]))  # accel^2; default 5 * 1


@pytest.mark.parametrize("contact_radius, mass_weighted", [("pairwise", False), ("first_agent", True)])
def test_cell_list_contact_equals_dense(contact_radius, mass_weighted):
    torch.manual_seed(0)
    n = 400
    sizes = [0.15 if i % 3 else 0.1 for i in range(n)] + [0.2] * 10
    options = PhysicsOptions(contact_radius=contact_radius, mass_weighted_contact=mass_weighted)
    worlds = [World(3, size=sizes, movable=[True] * n + [False] * 10, collide=[True] * (n + 10), n_agents=n,
                    mass=[1.0 + i % 4 for i in range(n + 10)], options=replace(options, dense_contact_limit=limit))
              for limit in (10 ** 6, 8)]
    position = (torch.rand(3, n + 10, 2) * 2 - 1) * 3.0
    position[:, 1] = position[:, 0] + 0.05  # a deep overlap
    position[2, 5] = torch.tensor([40.0, -40.0])  # a far-flung entity grows the cells, not the grid
    for world in worlds:
        world.position = position.clone()
    dense, cells = (world.contact_forces() for world in worlds)
    assert dense.abs().max() > 10
    assert torch.allclose(dense, cells, atol=2e-5)


def test_cell_list_candidates_cover_every_close_pair():
    torch.manual_seed(1)
    positions = torch.rand(2, 300, 2) * 5
    candidates, valid = cell_candidates(positions, positions, cell=0.3)
    for b in range(2):
        distance = torch.cdist(positions[b], positions[b])
        close = (distance < 0.3).nonzero().tolist()
        found = {(i, int(j)) for i in range(300) for j, ok in zip(candidates[b, i], valid[b, i]) if ok}
        assert all((i, j) in found for i, j in close)
        assert all(0 <= j < 300 for _, j in found)


@pytest.mark.parametrize("convention, expected", [
    ("mpe2", [[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]]),
    ("mpe", [[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]]),
])
def test_action_decoding(convention, expected):
    expected = torch.tensor(expected, dtype=torch.float32)
    assert torch.equal(decode_actions(torch.arange(5), convention), expected)
    soft = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    assert torch.allclose(decode_actions(soft, convention), soft @ expected)
    direct = torch.tensor([0.3, -0.7])
    assert torch.equal(decode_actions(direct, convention), direct)


def test_particle_env_refreshes_the_graph_every_graph_every_steps():
    env = vimarl.make_env("spread", 2, seed=4, n_agents=6, graph_every=5)
    step = env.reset(seed=4)
    first = step.groups["agents"].graph.neighbors.clone()
    positions_at = {}
    for t in range(1, 6):
        step = env.step({"agents": torch.randint(0, 5, (2, 6))})
        positions_at[t] = env.world.position[:, :6].clone()
        graph = step.groups["agents"].graph
        if t < 5:
            assert torch.equal(graph.neighbors, first)
    assert torch.equal(graph.neighbors, knn_graph(positions_at[5], 4).neighbors)


def test_particle_envs_are_reproducible_per_seed_and_differ_across_seeds():
    def initial(seed, num_envs):
        return vimarl.make_env("spread", num_envs, n_agents=4).reset(seed=seed).groups["agents"].obs
    assert torch.equal(initial(3, 2), initial(3, 5)[:2])
    assert not torch.allclose(initial(3, 2), initial(4, 2))
    assert not torch.allclose(initial(3, 2)[0], initial(3, 2)[1])


def test_render_draws_the_entities():
    env = vimarl.make_env("spread", 1, n_agents=3)
    env.reset(seed=0)
    image = env.render()
    assert image.dtype == np.uint8 and image.shape == (400, 400, 3)
    blue = (image == np.array([60, 90, 220], dtype=np.uint8)).all(-1).sum()
    assert blue > 3 * math.pi * 10 ** 2  # three agents of radius > 10 pixels


def test_render_keeps_the_view_of_an_episode_fixed():
    from vimarl.envs.particle.controllers import CoopNavOracle
    from vimarl.train import act

    env = vimarl.make_env("coop_nav_n15", 2)
    step = env.reset(seed=0)
    env.render()
    half, radius = env.view_half_width(), env.radius  # entities spawn in [-2.2, 2.2]^2
    assert radius < half <= (radius + 0.15) * 1.1
    oracle = CoopNavOracle(env)
    for _ in range(env.max_steps - 1):  # the agents drive to their landmarks: one view throughout
        step = env.step(act(oracle, step, explore=False))
        env.render()
        assert env.view_half_width() == half
    env.world.position[0, 0] = torch.tensor([3 * radius, 0.0])  # an agent leaves the view: it grows
    grown = env.view_half_width()
    assert grown > 3 * radius
    env.world.position[0, 0] = 0.0  # and does not shrink back within the episode
    assert env.view_half_width() == grown
    env.step({"agents": torch.zeros(2, 15, dtype=torch.long)})  # the last step: a new episode, a new view
    assert env.episode_step[0] == 0 and env.view_half_width() < grown
    views = [env.view_half_width()]
    for t in range(env.max_steps - 1):  # random play wanders out of the spawn box: a few rescales, growing only
        env.step({"agents": torch.randint(0, 5, (2, 15), generator=torch.Generator().manual_seed(t))})
        views.append(env.view_half_width())
    assert views == sorted(views) and len(set(views)) <= 3
    env.reset(seed=0)  # reset(seed) restarts the episode counters and the view
    assert env.view_half_width() == half


def test_eval_records_a_particle_episode_as_a_gif(tmp_path):
    env = vimarl.make_env("coop_nav_n6", 1)
    algo = vimarl.make_algo("vpp", env)
    frames = []
    vimarl.evaluate(algo, env, seed=0, frames=frames)
    assert len(frames) == 26  # the reset frame and one per step of the 25-step episode
    assert not np.array_equal(frames[0], frames[-1])  # the agents moved
    from vimarl.video import write_gif
    path = write_gif(frames, tmp_path / "episode.gif", fps=8)
    assert path.read_bytes()[:6] == b"GIF89a"
