"""VM3-AC, MAAC and MAMT particle tasks (pp_capture, treasure, rover_tower, spread3, spread_vm3ac).

No reference implementation of these scenarios installs here (VM3-AC and MAMT published no
code; MAAC's needs its MPE fork, not on PyPI), so every reward term, the order of events in a
step, the observation layouts and MAAC's physics quirks are checked on placed configurations
against values computed by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from vimarl.config import resolve
from vimarl.envs.base import Box, Discrete
from vimarl.envs.particle.scenarios.pp_capture import PPCaptureConfig
from vimarl.envs.particle.scenarios.rover_tower import RoverTowerConfig
from vimarl.envs.particle.scenarios.spread3 import Spread3Config
from vimarl.envs.particle.scenarios.treasure import TreasureConfig
from vimarl.envs.registry import make_env

NAMES = ("pp_capture_n2", "pp_capture_n3", "pp_capture_n4", "treasure", "rover_tower", "spread3", "spread_vm3ac")
FAR = 5.0


def place(env, positions, env_index: int = 0) -> None:
    """Put the entities of sub-environment `env_index` at `positions` ([E, 2]), at rest."""
    env.world.position[env_index] = torch.tensor(positions, dtype=torch.float32)
    env.world.velocity[env_index] = 0.0


def no_op(env) -> dict[str, torch.Tensor]:
    """Actions that apply no force: discrete 0 (no-op), continuous zeros."""
    actions = {}
    for name, spec in env.groups.items():
        shape = (env.num_envs, spec.n_agents)
        if isinstance(spec.action_space, Box):
            shape = (*shape, spec.action_space.dim)
        actions[name] = torch.zeros(shape, dtype=torch.float32 if len(shape) == 3 else torch.int64)
    return actions


def random_actions(env, generator) -> dict[str, torch.Tensor]:
    return {name: spec.action_space.sample((env.num_envs, spec.n_agents), generator, "cpu")
            for name, spec in env.groups.items()}


# -- pp_capture ---------------------------------------------------------------------------------
def test_pp_capture_needs_c_predators_at_once():
    env = make_env("pp_capture_n4", num_envs=1)  # C = 2
    env.reset(seed=0)
    lattice = env.world.position[0, 4:].tolist()
    prey0, prey1 = lattice[0], lattice[1]
    # Predators 0 and 1 within 0.1 < 0.125 of prey 0 (0.2 apart: no contact); predator 2 alone at prey 1.
    place(env, [[prey0[0] + 0.1, prey0[1]], [prey0[0] - 0.1, prey0[1]], [prey1[0], prey1[1] + 0.1],
                [FAR, FAR]] + lattice)
    step = env.step(no_op(env))
    assert torch.equal(step.groups["predators"].reward, torch.full((1, 4), 10.0))
    alive = env.prey_alive[0]
    assert not alive[0] and alive[1:].all()  # C - 1 = 1 predator does not capture prey 1
    obs = step.groups["predators"].obs[0, 0]
    assert obs[4 + 12 + 32:4 + 12 + 48].tolist() == alive.float().tolist()
    # A removed prey yields nothing more, even with C predators on it.
    assert torch.equal(env.step(no_op(env)).groups["predators"].reward, torch.zeros(1, 4))


def test_pp_capture_respawns_all_prey_with_a_larger_reward():
    env = make_env("pp_capture_n2", num_envs=1)  # C = 1
    env.reset(seed=0)
    lattice = env.world.position[0, 2:].tolist()
    env.prey_alive[0] = torch.arange(16) == 5  # only prey 5 left
    place(env, [lattice[5], [FAR, FAR]] + lattice)
    step = env.step(no_op(env))
    assert torch.equal(step.groups["predators"].reward, torch.full((1, 2), 10.0))
    assert env.prey_alive.all() and env.rounds_cleared.item() == 1  # back at the same positions
    assert torch.equal(env.world.position[0, 2:], torch.tensor(lattice))
    assert step.groups["predators"].obs[0, 0, -1].item() == 1.0
    place(env, [lattice[3], [FAR, FAR]] + lattice)
    assert torch.equal(env.step(no_op(env)).groups["predators"].reward, torch.full((1, 2), 20.0))


def test_pp_capture_observation_layout_and_lattice():
    env = make_env("pp_capture_n3", num_envs=1)
    assert env.groups["predators"].obs_dim == 4 + 4 * 2 + 3 * 16 + 1 == 61
    assert env.groups["predators"].action_space == Box(-1.0, 1.0, 2)
    env.reset(seed=0)
    lattice = env.world.position[0, 3:]
    assert torch.allclose(lattice[:4], torch.tensor([[-0.75, -0.75], [-0.75, -0.25], [-0.75, 0.25], [-0.75, 0.75]]))
    place(env, [[0.1, 0.2], [0.3, -0.4], [-0.5, 0.6]] + lattice.tolist())
    env.world.velocity[0, :3] = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    obs = env._observe()[0]["predators"].obs[0, 1]
    expected = [3.0, 4.0, 0.3, -0.4, -0.2, 0.6, -0.8, 1.0, 1.0, 2.0, 5.0, 6.0]
    expected += (lattice - torch.tensor([0.3, -0.4])).flatten().tolist() + [1.0] * 16 + [0.0]
    assert torch.allclose(obs, torch.tensor(expected))


def test_pp_capture_continuous_force_and_discrete_mpe_layout():
    # Original MPE physics with simple_tag's predator accel 3: v' = 0.75 v + 0.1 * 3 u, p' = p + 0.1 v'.
    for mode, action in (("continuous", torch.tensor([[[1.0, 0.0], [0.0, -0.5]]])),
                         ("discrete", torch.tensor([[1, 4]]))):  # MPE layout: 1 = +x, 4 = -y
        env = make_env("pp_capture_n2", num_envs=1, action_mode=mode)
        env.reset(seed=0)
        place(env, [[-1.0, 1.0], [1.0, 1.0]] + env.world.position[0, 2:].tolist())
        start = env.world.position[0, :2].clone()
        env.step({"predators": action})
        dv = torch.tensor([[0.3, 0.0], [0.0, -0.15 if mode == "continuous" else -0.3]])
        assert torch.allclose(env.world.velocity[0, :2], dv)
        assert torch.allclose(env.world.position[0, :2], start + 0.1 * dv)


# -- treasure -----------------------------------------------------------------------------------
SMALL_TREASURE = dict(n_collectors=2, n_deposits=2, n_treasures=2)
# Entities: collectors 0-1, deposits 2-3, treasures 4-5.


def test_treasure_every_reward_term():
    env = make_env("treasure", num_envs=1, **SMALL_TREASURE)
    env.reset(seed=0)
    # Collector 0 empty, touching treasure 0 (0.05 < 0.075); collector 1 holds type 0 and touches
    # deposit 0 (0.1 < 0.125); deposit 1 has no holder of its type.
    place(env, [[0.0, 0.0], [0.5, 0.0], [0.5, 0.1], [-0.5, -0.5], [0.05, 0.0], [0.9, 0.9]])
    env.holding[0] = torch.tensor([-1, 0])
    env.treasure_type[0] = torch.tensor([1, 0])
    rewards = env.rewards()
    team = 5.0 + 5.0  # one collection, one delivery
    assert torch.allclose(rewards["collectors"], torch.tensor([[team - 0.1 * 0.05, team - 0.1 * 0.1]]))
    centroid_distance = math.hypot(0.25 + 0.5, 0.0 + 0.5)  # centroid of both collectors (0.25, 0)
    assert torch.allclose(rewards["deposits"], torch.tensor([[team - 0.1 * 0.1, team - 0.1 * centroid_distance]]))

    # Two colliding collectors (0.08 < 0.1), both empty, nothing touching: -5 each, no team reward.
    place(env, [[0.0, 0.0], [0.08, 0.0], [0.5, 0.5], [-0.5, -0.5], [0.0, 0.3], [0.0, -0.4]])
    env.holding[0] = -1
    rewards = env.rewards()
    assert torch.allclose(rewards["collectors"], torch.tensor([[-5 - 0.1 * 0.3, -5 - 0.1 * math.hypot(0.08, 0.3)]]))
    crowd = math.hypot(0.04 - 0.5, -0.5)
    assert torch.allclose(rewards["deposits"], torch.tensor([[-0.1 * crowd, -0.1 * math.hypot(0.54, 0.5)]]))


def test_treasure_pickup_deposit_and_respawn_follow_maac_post_step():
    env = make_env("treasure", num_envs=1, **SMALL_TREASURE)
    env.reset(seed=0)
    # Collector 1 sits exactly on deposit 0 (zero distance: no contact force) holding type 0;
    # collector 0 touches treasure 0 (type 1).
    place(env, [[0.0, 0.0], [0.5, 0.5], [0.5, 0.5], [-0.5, -0.5], [0.06, 0.0], [0.9, -0.9]])
    env.holding[0] = torch.tensor([-1, 0])
    env.treasure_type[0] = torch.tensor([1, 0])
    step = env.step(no_op(env))
    # Rewards and observations come before MAAC's post_step: nothing picked up or dropped yet.
    assert step.groups["collectors"].reward[0, 0].item() == pytest.approx(10.0 - 0.1 * 0.06)
    collector_obs = step.groups["collectors"].obs[0, 0]
    assert collector_obs[4:6].tolist() == [0.0, 0.0]  # holding nothing
    step = env.step(no_op(env))
    assert env.holding[0].tolist() == [1, -1]  # picked up type 1; delivered type 0
    assert not env.alive[0, 0] and env.world.position[0, 4].tolist() == [-999.0, -999.0]
    collector_obs = step.groups["collectors"].obs[0, 0]
    assert collector_obs[4:6].tolist() == [0.0, 1.0]
    # The dead treasure is the farthest one, seen last, at (-999, -999) - p (MAAC's quirk).
    assert collector_obs[-4:-2].tolist() == [-999.0, -999.0]
    # Holding: shaping is the distance to deposit 1; the treasure is gone, collector 1 empty: G = 0.
    assert step.groups["collectors"].reward[0, 0].item() == pytest.approx(-0.1 * math.hypot(0.5, 0.5))
    env.step(no_op(env))
    assert env.alive[0].all() and (env.world.position[0, 4].abs() <= 0.95).all()  # respawned


def test_treasure_first_collector_in_index_order_picks_up_and_instant_respawn():
    for instant in (False, True):
        env = make_env("treasure", num_envs=1, instant_respawn=instant, **SMALL_TREASURE)
        env.reset(seed=0)
        # Both collectors touch treasure 0 (0.07 < 0.075) without touching each other (0.14 > 0.1).
        place(env, [[0.07, 0.0], [-0.07, 0.0], [0.5, 0.5], [-0.5, -0.5], [0.0, 0.0], [0.9, -0.9]])
        step = env.step(no_op(env))
        # Both count for the collecting reward; the deposit's shaping is the collectors' centroid.
        assert step.groups["deposits"].reward[0, 0].item() == pytest.approx(10.0 - 0.1 * math.hypot(0.5, 0.5))
        picked_type = env.treasure_type[0, 0].item()
        env.step(no_op(env))
        assert env.holding[0].tolist() == [picked_type, -1]  # only the lower index picks it up
        assert bool(env.alive[0, 0]) == instant
        assert (env.world.position[0, 4, 0].item() == -999.0) != instant


def test_treasure_pickup_and_delivery_in_one_post_step_earn_no_deposit_reward():
    env = make_env("treasure", num_envs=1, **SMALL_TREASURE)
    env.reset(seed=0)
    # Collector 0 sits on deposit 0 and touches treasure 0, of deposit 0's type.
    place(env, [[0.5, 0.5], [-0.9, 0.9], [0.5, 0.5], [-0.5, -0.5], [0.55, 0.5], [0.9, -0.9]])
    env.treasure_type[0] = torch.tensor([0, 1])
    first = env.step(no_op(env))
    second = env.step(no_op(env))
    assert env.holding[0].tolist() == [-1, -1] and not env.alive[0, 0]  # picked up and dropped at once
    crowd = math.hypot(0.5 + 0.2, 0.5 - 0.7)  # the collectors' centroid is (-0.2, 0.7)
    assert first.groups["deposits"].reward[0, 0].item() == pytest.approx(5.0 - 0.1 * crowd)
    assert second.groups["deposits"].reward[0, 0].item() == pytest.approx(-0.1 * crowd)


def test_treasure_observation_layout():
    env = make_env("treasure", num_envs=1)
    assert (env.groups["collectors"].obs_dim, env.groups["deposits"].obs_dim) == (86, 84)
    env = make_env("treasure", num_envs=1, **SMALL_TREASURE)
    assert (env.groups["collectors"].obs_dim, env.groups["deposits"].obs_dim) == (4 + 2 + 3 * 8 + 2 * 4, 4 + 3 * 8 + 2 * 4)
    env.reset(seed=0)
    place(env, [[0.0, 0.0], [0.3, 0.0], [0.0, -0.2], [1.0, 1.0], [0.0, 0.5], [-0.1, 0.0]])
    env.world.velocity[0, :4] = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]])
    env.holding[0] = torch.tensor([1, -1])
    env.treasure_type[0] = torch.tensor([0, 1])
    obs = env._observe()[0]["collectors"].obs[0, 0]
    expected = [0.0, 0.0, 0.1, 0.2, 0.0, 1.0]
    expected += [0.0, -0.2, 0.5, 0.6, 1.0, 0.0, 0.0, 0.0]  # deposit 0 (0.2 away), its type in the first half
    expected += [0.3, 0.0, 0.3, 0.4, 0.0, 0.0, 0.0, 0.0]  # collector 1 (0.3), empty
    expected += [1.0, 1.0, 0.7, 0.8, 0.0, 1.0, 0.0, 0.0]  # deposit 1
    expected += [-0.1, 0.0, 0.0, 1.0, 0.0, 0.5, 1.0, 0.0]  # treasures by distance
    assert torch.allclose(obs, torch.tensor(expected))


def test_maac_physics_net_acceleration_is_accel_squared_for_any_mass():
    env = make_env("treasure", num_envs=1, **SMALL_TREASURE)
    env.reset(seed=0)
    place(env, [[-0.9, -0.9], [0.9, -0.9], [-0.9, 0.9], [0.9, 0.9], [FAR, FAR], [-FAR, FAR]])
    env.step({"collectors": torch.tensor([[1, 0]]), "deposits": torch.tensor([[1, 0]])})  # +x
    # a = 1.5^2 = 2.25 per unit action for collectors (mass 1) and deposits (mass 2.25) alike.
    assert torch.allclose(env.world.velocity[0, [0, 2], 0], torch.tensor([0.225, 0.225]))


def test_maac_physics_contact_is_mass_weighted():
    env = make_env("treasure", num_envs=1, **SMALL_TREASURE)
    env.reset(seed=0)
    # Collector 0 (mass 1) and deposit 0 (mass 2.25) 0.1 apart, contact distance 0.125.
    place(env, [[0.0, 0.0], [0.9, -0.9], [0.1, 0.0], [0.9, 0.9], [FAR, FAR], [-FAR, FAR]])
    env.step(no_op(env))
    force = 100 * 1e-3 * math.log1p(math.exp(0.025 / 1e-3))  # softplus penetration, about 2.5
    assert env.world.velocity[0, 0, 0].item() == pytest.approx(-2.25 * force * 0.1, rel=1e-5)
    assert env.world.velocity[0, 2, 0].item() == pytest.approx(force / 2.25 / 2.25 * 0.1, rel=1e-5)


# -- rover_tower --------------------------------------------------------------------------------
def test_rover_tower_pair_rewards_with_maac_squared_threshold():
    env = make_env("rover_tower", num_envs=1)
    env.reset(seed=0)
    env.tower_rover[0] = torch.tensor([2, 0, 3, 1])
    env.rover_tower[0] = torch.tensor([1, 3, 0, 2])
    env.goal[0] = torch.tensor([0, 0, 5, 3])
    landmarks = [[0.0, 0.0], [FAR, 0.0], [FAR, 1.0], [0.0, 1.0], [FAR, 2.0], [-1.0, -1.0]]
    rovers = [[0.0, 0.5],  # tower 1's rover, goal landmark 0: d^2 = 0.25, no bonus
              [0.0, 0.3],  # tower 3's rover, goal landmark 3: d^2 = 0.49
              [0.0, 0.41],  # tower 0's rover, goal landmark 0: d = 0.41 > 0.1725 but d^2 = 0.1681 < 0.1725
              [-1.0, -1.2]]  # tower 2's rover, goal landmark 5: d^2 = 0.04
    place(env, rovers + [[0.5, 0.5]] * 4 + landmarks)
    rewards = env.rewards()
    by_tower = torch.tensor([[-0.1681 + 10, -0.25, -0.04 + 10, -0.49]])
    assert torch.allclose(rewards["towers"], by_tower)
    assert torch.allclose(rewards["rovers"], torch.tensor([[-0.25, -0.49, -0.1681 + 10, -0.04 + 10]]))


def test_rover_tower_messages_and_observation_layout():
    env = make_env("rover_tower", num_envs=1)
    assert (env.groups["rovers"].obs_dim, env.groups["towers"].obs_dim) == (13, 8)
    assert env.groups["towers"].action_space == Discrete(5)
    env.reset(seed=0)
    env.tower_rover[0] = torch.tensor([2, 0, 3, 1])
    env.rover_tower[0] = torch.tensor([1, 3, 0, 2])
    env.goal[0] = torch.tensor([0, 0, 5, 3])
    positions = env.world.position[0].clone()
    step = env.step({"rovers": torch.zeros(1, 4, dtype=torch.int64), "towers": torch.tensor([[1, 4, 0, 2]])})
    rover = step.groups["rovers"].obs[0, 1]  # listens to tower 3, which sent message 2
    expected = [0, 0, 0, 1, 0, 0, 1, 0, 0] + positions[1].tolist() + [0.0, 0.0]
    assert torch.allclose(rover, torch.tensor(expected))
    tower = step.groups["towers"].obs[0, 2]  # talks to rover 3, goal landmark 5 (entity 8 + 5)
    assert torch.allclose(tower, torch.tensor([0, 0, 0, 1] + positions[3].tolist() + positions[13].tolist()))


def test_rover_tower_pairing_is_a_permutation_and_rovers_accelerate_by_accel_squared():
    env = make_env("rover_tower", num_envs=16, seed=3)
    env.reset()
    assert torch.equal(env.tower_rover.sort(-1).values, torch.arange(4).expand(16, 4))
    assert torch.equal(env.rover_tower.gather(1, env.tower_rover), torch.arange(4).expand(16, 4))
    assert len({tuple(p) for p in env.tower_rover.tolist()}) > 1
    env.step({"rovers": torch.ones(16, 4, dtype=torch.int64), "towers": torch.zeros(16, 4, dtype=torch.int64)})
    assert torch.allclose(env.world.velocity[:, :4], torch.tensor([0.225, 0.0]).expand(16, 4, 2))
    assert torch.equal(env.world.velocity[:, 4:], torch.zeros(16, 10, 2))  # towers never move


# -- spread3 ------------------------------------------------------------------------------------
# Landmarks l0 (0, 0), l1 (1, 0), l2 (0, 1); agents p0 (0.1, 0), p1 (0.3, 0), p2 (0, 0.6).
# d(agent, landmark): agent 0 (0.1, 0.9, 1.00499), agent 1 (0.3, 0.7, 1.04403), agent 2 (0.6, 1.16619, 0.4).
# Agents 0 and 1 are 0.2 < 0.3 apart (colliding); agent 2 touches nobody.
SPREAD3_PLACEMENT = [[0.1, 0.0], [0.3, 0.0], [0.0, 0.6], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize("coupling, expected", [
    ("sep", [-0.1, -0.7, -0.4]),  # own landmark only, no collisions
    ("mix", [-(0.1 + 0.7) - 1, -(0.1 + 0.7) - 1, -0.4]),  # 0 and 1 cover l0, l1 together
    ("ful", [-(0.1 + 0.7 + 0.4) - 1, -(0.1 + 0.7 + 0.4) - 1, -(0.1 + 0.7 + 0.4)]),
])
def test_spread3_rewards_per_coupling(coupling, expected):
    env = make_env("spread3", num_envs=1, coupling=coupling)
    env.reset(seed=0)
    place(env, SPREAD3_PLACEMENT)
    assert torch.allclose(env.rewards()["agents"], torch.tensor([expected]))


@pytest.mark.parametrize("coupling, contact, pushed", [
    ("sep", "coupled", [False, False, False]), ("mix", "coupled", [True, True, False]),
    ("ful", "coupled", [True, True, True]), ("sep", "all", [True, True, True]),
])
def test_spread3_contact_follows_the_coupling(coupling, contact, pushed):
    env = make_env("spread3", num_envs=1, coupling=coupling, contact=contact)
    env.reset(seed=0)
    # Agents 0 and 1 overlap (0.2 < 0.3 apart), and so do agents 0 and 2 (0.25), not 1 and 2.
    place(env, [[0.0, 0.0], [0.2, 0.0], [-0.25, 0.0], [FAR, 0.0], [FAR, 1.0], [FAR, 2.0]])
    env.step(no_op(env))
    moved = env.world.velocity[0, :3].norm(dim=-1) > 0
    assert moved.tolist() == pushed


def test_spread3_observation_layout():
    env = make_env("spread3", num_envs=1)
    assert env.groups["agents"].obs_dim == 14
    env.reset(seed=0)
    place(env, SPREAD3_PLACEMENT)
    obs = env._observe()[0]["agents"].obs[0, 2]
    expected = [0.0, 0.0, 0.0, 0.6, 0.0, -0.6, 1.0, -0.6, 0.0, 0.4, 0.1, -0.6, 0.3, -0.6]
    assert torch.allclose(obs, torch.tensor(expected))


# -- spread_vm3ac -------------------------------------------------------------------------------
@pytest.mark.parametrize("placement, expected", [
    # d(landmark, nearest agent) = 0.1, 0.7, 0.4; agents 0 and 1 collide; landmark 1 is free.
    (SPREAD3_PLACEMENT, [-1.2 - 10, -1.2 - 10, -1.2]),
    # Every landmark touched (0.1, 0.15, 0.0 < 0.2), agents 0.9+ apart: coverage -0.25 plus R3 = 1.
    ([[0.1, 0.0], [1.0, 0.15], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [0.75, 0.75, 0.75]),
])
def test_spread_vm3ac_rewards_follow_002_app_f(placement, expected):
    env = make_env("spread_vm3ac", num_envs=1)
    env.reset(seed=0)
    place(env, placement)
    assert torch.allclose(env.rewards()["agents"], torch.tensor([expected]))


def test_spread_vm3ac_task_settings():
    env = make_env("spread_vm3ac", num_envs=1)
    spec = env.groups["agents"]
    assert (spec.n_agents, spec.obs_dim, env.max_steps) == (3, 18, 50)
    assert isinstance(spec.action_space, Box) and spec.action_space.dim == 2
    env.reset(seed=0)
    place(env, [[0.1, 0.0], [1.0, 0.15], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    env.step({"agents": torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])})
    # Unit force times sensitivity 5 over dt = 0.1; MPE order: the position moves by the new velocity.
    assert env.world.velocity[0, 0].tolist() == pytest.approx([0.5, 0.0])
    assert env.world.position[0, 0].tolist() == pytest.approx([0.15, 0.0])


# -- every task ---------------------------------------------------------------------------------
def initial_state(name: str, num_envs: int, seed: int, **kwargs) -> torch.Tensor:
    env = make_env(name, num_envs=num_envs, seed=seed, **kwargs)
    return env.reset().state


@pytest.mark.parametrize("name", NAMES)
def test_each_sub_environment_replays_its_own_initial_state(name):
    batch = initial_state(name, 3, seed=7)
    assert torch.equal(batch[:1], initial_state(name, 1, seed=7))
    assert not torch.equal(batch[0], batch[1])
    assert not torch.equal(batch[0], initial_state(name, 1, seed=8)[0])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("action_mode", ["discrete", "continuous"])
def test_auto_reset_returns_final_obs_and_restarts_like_a_reset(name, action_mode):
    env = make_env(name, num_envs=2, seed=1, action_mode=action_mode, episode_length=4)
    fresh = make_env(name, num_envs=2, seed=1, action_mode=action_mode, episode_length=4)
    generator = torch.Generator().manual_seed(0)
    env.reset(seed=1)
    for _ in range(3):
        last = env.step(random_actions(env, generator))
    step = env.step(random_actions(env, generator))
    assert step.truncated.all() and not step.terminated.any()
    fresh.reset(seed=1)
    restarted = fresh.reset()  # episode 1 of every sub-environment
    actions = random_actions(env, generator)
    for group, group_step in step.groups.items():
        assert group_step.obs.shape == (2, env.groups[group].n_agents, env.groups[group].obs_dim)
        assert torch.equal(group_step.obs, restarted.groups[group].obs)
        assert not torch.equal(step.info["final_obs"][group], group_step.obs)
        assert not torch.equal(step.info["final_obs"][group], last.groups[group].obs)
    assert torch.equal(step.state, restarted.state)
    # Nothing of the finished episode (e.g. a pending MAAC post_step) leaks into the new one.
    after, expected = env.step(actions), fresh.step(actions)
    for group in step.groups:
        assert torch.equal(after.groups[group].obs, expected.groups[group].obs)
        assert torch.equal(after.groups[group].reward, expected.groups[group].reward)


@pytest.mark.parametrize("name", NAMES)
def test_presets_resolve_with_the_registry_values(name):
    run = resolve("vpp", name)
    assert run.env_config == make_env(name).config
    if name == "pp_capture_n4":
        assert (run.env_config.n_predators, run.env_config.capture_threshold) == (4, 2)


@pytest.mark.parametrize("config_cls, values", [
    (PPCaptureConfig, {"n_prey": 15}), (PPCaptureConfig, {"capture_threshold": 3, "n_predators": 2}),
    (PPCaptureConfig, {"capture_radius": 0.0}), (TreasureConfig, {"n_deposits": 0}),
    (TreasureConfig, {"n_visible": 0}), (RoverTowerConfig, {"n_pairs": 0}),
    (Spread3Config, {"coupling": "pairs"}), (Spread3Config, {"collision_penalty": -1.0}),
])
def test_configs_reject_bad_values(config_cls, values):
    with pytest.raises(ValueError):
        config_cls(**values)
