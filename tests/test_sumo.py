"""The SUMO backend (vimarl.envs.external.sumo): the batched traffic env's interface on libsumo,
signal states, vehicle conservation, and the cross-check of average travel times."""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("libsumo") is None or importlib.util.find_spec("sumo") is None:
    pytest.skip("SUMO is not installed: pip install 'vimarl[sumo]'", allow_module_level=True)

import libsumo  # noqa: E402

from vimarl.envs.external.sumo import SumoConfig, write_routes  # noqa: E402
from vimarl.envs.registry import make_env  # noqa: E402
from vimarl.envs.traffic import FixedTimePolicy  # noqa: E402
from vimarl.train import evaluate  # noqa: E402

torch.set_num_threads(1)
CROSS_CHECK_TOLERANCE = 0.15
"""Relative difference allowed between SUMO's and the batched model's average travel time."""


def actions(env, values) -> dict:
    return {"agents": torch.as_tensor(values, dtype=torch.int64).expand(env.num_envs, env.n_nodes)}


def test_interface_and_graph_match_the_batched_env():
    env = make_env("sumo_grid_3x3", episode_length=2)
    batched = make_env("traffic_grid_3x3")
    try:
        assert env.groups == batched.groups and env.state_dim == batched.state_dim
        assert torch.equal(env.graph.neighbors, batched.graph.neighbors)
        assert torch.equal(env.graph.mask, batched.graph.mask)
        assert env.layout.tls_ids == batched.network.node_ids
        # Every intersection has one lane per (approach, movement) and one outgoing edge per direction.
        slots = env.layout.queue_pairs[:, 0]
        assert sorted(slots.tolist()) == list(range(9 * 12))
        assert sorted(env.layout.out_pairs[:, 0].tolist()) == sorted(list(range(9 * 4)) * 3)
        step = env.reset(seed=0)
        assert step.groups["agents"].obs.shape == (1, 9, 38) and step.state.shape == (1, 91)
    finally:
        env.close()


def test_complete_graph_matches_the_batched_env():
    env = make_env("sumo_grid_2x2", episode_length=2, graph="complete")
    try:
        batched = make_env("traffic_grid_2x2", graph="complete")
        assert env.groups == batched.groups and env.groups["agents"].graph_k == 3
        assert torch.equal(env.graph.neighbors, batched.graph.neighbors) and env.graph.mask.all()
    finally:
        env.close()


def test_phases_are_applied_with_transitions():
    env = make_env("sumo_grid_2x2", decision_seconds=3, yellow_seconds=5, episode_length=10)
    try:
        sim = env._sims[0]
        env.reset(seed=0)
        tls = env.layout.tls_ids
        assert all(libsumo.trafficlight.getRedYellowGreenState(t) == sim.phase_states[i][1] for i, t in enumerate(tls))
        # Change from action 0 (lightphase 1, E-W through) to action 3 (N-S left): 5 s of yellow on
        # the E-W throughs, so after a 3 s decision the transition still shows.
        step = env.step(actions(env, 3))
        for i, t in enumerate(tls):
            state = libsumo.trafficlight.getRedYellowGreenState(t)
            assert state == sim.transition_states[i][1] and "y" in state and "G" not in state
        obs = step.groups["agents"].obs
        assert torch.all(obs[..., 8] == 1) and torch.all(obs[..., 3] == 1)  # transition flag, phase one-hot
        step = env.step(actions(env, 3))  # seconds 4..6: the new phase from second 6 on
        for i, t in enumerate(tls):
            state = libsumo.trafficlight.getRedYellowGreenState(t)
            assert state == sim.phase_states[i][4]
            moves = env.layout.link_moves[i]
            # N-S left: green exactly on the left-turn links of headings N (1) and S (3), and rights (g).
            assert [k for k, c in enumerate(state) if c == "G"] == [k for k, (h, m) in enumerate(moves)
                                                                    if m == 0 and h in (1, 3)]
            assert [k for k, c in enumerate(state) if c == "g"] == [k for k, (h, m) in enumerate(moves) if m == 2]
        assert torch.all(step.groups["agents"].obs[..., 8] == 0)
    finally:
        env.close()


def test_vehicles_are_conserved_and_observations_are_sumo_counts():
    env = make_env("sumo_grid_2x2", episode_length=30, demand_vph=900)
    try:
        step = env.reset(seed=1)
        policy = FixedTimePolicy(env.groups)
        generated = []
        for _ in range(30):
            step = env.step(policy.act({"agents": step.groups["agents"].obs}, None, explore=False))
            m = env.last_metrics
            assert m["vehicles_generated"].item() == m["vehicles_exited"].item() + m["vehicles_in_network"].item()
            assert m["vehicles_in_network"].item() == libsumo.vehicle.getIDCount() + len(
                libsumo.simulation.getPendingVehicles()) or step.done.item()
            generated.append(m["vehicles_generated"].item())
        # 900 veh/h on 8 entry roads for 300 s: 600 expected.
        assert 520 < generated[-1] < 680 and generated == sorted(generated)
        assert env.last_metrics["vehicles_exited"].item() > 100
        assert step.info["average_travel_time"].item() == pytest.approx(
            env.last_metrics["average_travel_time"].item())
        assert step.done.item() and env.average_travel_time().item() == 0  # auto-reset: a fresh episode
    finally:
        env.close()


def test_observation_queues_are_halting_vehicles_and_reward_is_minus_queue():
    env = make_env("sumo_grid_2x2", episode_length=50, demand_vph=1200, yellow_seconds=0, decision_seconds=1)
    try:
        env.reset(seed=0)
        for _ in range(40):
            step = env.step(actions(env, 1))  # N-S through held: E-W queues build up
        obs = step.groups["agents"].obs[0]
        layout = env.layout
        for i in range(env.n_nodes):
            for slot, lane in layout.queue_pairs:
                if slot // 12 == i:
                    k = slot % 12
                    assert obs[i, 10 + k].item() * 20 == pytest.approx(
                        libsumo.lane.getLastStepHaltingNumber(layout.lanes[lane]))
        queued = obs[:, 10:22].sum(-1) / 0.05
        assert queued.sum() > 10  # the red approaches queue
        assert torch.allclose(step.groups["agents"].reward[0], -0.25 * queued)
    finally:
        env.close()


def test_cross_check_average_travel_time_against_the_batched_model():
    """Fixed-time control (30 s phases) on the 2 x 2 grid, default demand, full episodes: the two
    sub-environments of each simulator (different draws of the same demand process) average
    within CROSS_CHECK_TOLERANCE; the SUMO env runs as a pool of 2 worker processes."""
    sumo = make_env("sumo_grid_2x2", num_envs=2)
    batched = make_env("traffic_grid_2x2", num_envs=2)
    try:
        evaluate(FixedTimePolicy(sumo.groups), sumo, seed=0)
        evaluate(FixedTimePolicy(batched.groups), batched, seed=0)
        att_sumo = sumo.last_metrics["average_travel_time"].mean().item()
        att_batched = batched.last_metrics["average_travel_time"].mean().item()
        assert sumo.last_metrics["teleports"].sum().item() == 0
        assert abs(att_sumo - att_batched) / att_batched < CROSS_CHECK_TOLERANCE, (att_sumo, att_batched)
        assert 100 < att_sumo < 300
    finally:
        sumo.close()


def test_batch_size_invariance_and_reset_replay():
    """Sub-environment 0 of a 2-worker pool replays the in-process B = 1 episode (same seed)."""
    kwargs = dict(episode_length=20)
    single = make_env("sumo_grid_2x2", **kwargs)
    pool = make_env("sumo_grid_2x2", num_envs=2, **kwargs)
    try:
        for env in (single, pool):
            evaluate(FixedTimePolicy(env.groups), env, seed=3)
        a, b = single.last_metrics, pool.last_metrics
        assert a["vehicles_generated"].item() == b["vehicles_generated"][0].item()
        assert a["average_travel_time"].item() == pytest.approx(b["average_travel_time"][0].item())
        assert b["vehicles_generated"][0] != b["vehicles_generated"][1]
        first = single.last_metrics["average_travel_time"].item()
        evaluate(FixedTimePolicy(single.groups), single, seed=3)
        assert single.last_metrics["average_travel_time"].item() == pytest.approx(first)
    finally:
        single.close()
        pool.close()


def test_sumo_net_with_a_route_file(tmp_path):
    grid = make_env("sumo_grid_2x2", episode_length=1)
    net_path = tmp_path / "grid.net.xml"
    net_path.write_bytes(open(grid.net_path, "rb").read())
    grid.close()
    routes = tmp_path / "routes.rou.xml"
    vehicles = [(t, ["road_0_1_0", "road_1_1_0", "road_2_1_0"]) for t in range(0, 60, 4)]
    vehicles += [(t, ["road_1_0_1", "road_1_1_1", "road_1_2_1"]) for t in range(2, 60, 4)]
    write_routes(routes, sorted(vehicles), SumoConfig(net=str(net_path), routes=str(routes)))
    env = make_env("sumo_net", net=str(net_path), routes=str(routes), episode_length=50)
    try:
        assert env.n_nodes == 4
        evaluate(FixedTimePolicy(env.groups), env, seed=0)
        m = env.last_metrics
        assert m["vehicles_generated"].item() == 30 and m["vehicles_exited"].item() == 30
        # 3 roads of 300 m at 11.1 m/s (81 s) plus red lights (fixed time: up to 90 s per signal).
        assert 81 < m["average_travel_time"].item() < 81 + 2 * 90
    finally:
        env.close()
