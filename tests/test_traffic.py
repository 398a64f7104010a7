"""The batched traffic-signal model (vimarl.envs.traffic) against hand-computed cases and invariants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vimarl
from vimarl.config import parse_overrides, resolve
from vimarl.envs.registry import make_env
from vimarl.envs.traffic import (
    FixedTimePolicy,
    MaxPressurePolicy,
    TrafficConfig,
    TrafficSignalEnv,
    load_cityflow,
)
from vimarl.envs.traffic.network import STANDARD_PHASES
from vimarl.errors import VimarlError
from vimarl.checkpoint import load_trained
from vimarl.train import eval_seed, evaluate

torch.set_num_threads(1)
DATA = Path(__file__).parent / "data"
ROADNET_1X1, ROADNET_1X2 = str(DATA / "roadnet_1x1.json"), str(DATA / "roadnet_1x2.json")


def write_flows(path: Path, *flows) -> str:
    """A CityFlow flow file with one vehicle per (route, time)."""
    vehicle = {"length": 5.0, "width": 2.0, "maxPosAcc": 2.0, "maxNegAcc": 4.5, "usualPosAcc": 2.0,
               "usualNegAcc": 4.5, "minGap": 2.5, "maxSpeed": 11.111, "headwayTime": 2}
    path.write_text(json.dumps([{"vehicle": vehicle, "route": route, "interval": 1.0, "startTime": time,
                                 "endTime": time} for route, time in flows]))
    return str(path)


def conflict_matrix() -> np.ndarray:
    """[12, 12] conflicts between the left (m = 0) and through (m = 1) movements of the 4
    approaches (index 3 h + m), by hand: movements are compatible only when they come from the
    same approach, or are both throughs or both lefts of opposite approaches. Right turns (always
    permitted, as in CityFlow's benchmark phases) are left out."""
    conflict = np.zeros((12, 12), dtype=bool)
    for h1 in range(4):
        for m1 in (0, 1):
            for h2 in range(4):
                for m2 in (0, 1):
                    compatible = h1 == h2 or ((h1 - h2) % 4 == 2 and m1 == m2)
                    conflict[3 * h1 + m1, 3 * h2 + m2] = not compatible
    return conflict


def run_ticks(env: TrafficSignalEnv, actions_per_step, check=None):
    """Step with decision_seconds = 1 (one tick per step); `actions_per_step[k]` is [N] or [B, N]."""
    step = None
    for k, action in enumerate(actions_per_step):
        action = torch.as_tensor(action).expand(env.num_envs, env.n_nodes)
        step = env.step({"agents": action})
        if check is not None:
            check(k, step)
    return step


# -- hand-computed travel times -------------------------------------------------------------------------


def test_one_intersection_travel_times_by_hand(tmp_path):
    # Roads of 30 m at 10 m/s take 3 s; a green lane discharges 0.5 veh/s from a credit capped at 1.
    # v1, v2 eastbound through at t = 0: v1 enters at 0, reaches the stop line at 3 (credit full:
    # leaves at once), exits the 3 s exit road at 6 -> 6 s. v2 waits in the entry buffer (one entry
    # per second), enters at 1, queues at 4, credit 0.5 at 4 and 1 at 5 -> leaves at 5, exits at 8
    # -> 8 s. v3 northbound through at t = 0 queues at 3 on red; the phase switches to N-S through
    # at decision 6 with 2 s of transition (ticks 6, 7), credit 0.5 at 8 and 1 at 9 -> leaves at
    # 9, exits at 12 -> 12 s.
    flow = write_flows(tmp_path / "flow.json", (["road_0_1_0", "road_1_1_0"], 0), (["road_0_1_0", "road_1_1_0"], 0),
                       (["road_1_0_1", "road_1_1_1"], 0))
    env = make_env("traffic_cityflow", 1, roadnet=ROADNET_1X1, flow=flow, decision_seconds=1, yellow_seconds=2,
                   episode_length=30)
    env.reset(seed=0)
    assert env.travel_ticks.tolist() == [3] * env.n_roads
    actions = [0] * 6 + [1] * 7
    queued = []
    step = run_ticks(env, actions[:11], lambda k, s: queued.append(-s.groups["agents"].reward[0, 0].item() / 0.25))
    # After 11 s (ticks 0..10) v3 is still in: CityFlow's average counts its 11 s so far.
    assert step.info["average_travel_time"].item() == pytest.approx((6 + 8 + 11) / 3)
    assert step.info["vehicles_exited"].item() == 2
    step = run_ticks(env, actions[11:])
    assert step.info["vehicles_exited"].item() == 3 and step.info["vehicles_in_network"].item() == 0
    assert env.average_travel_time().item() == pytest.approx((6 + 8 + 12) / 3)
    # Waiting vehicles at the intersection after each second: v1 queues 0 s (arrives and leaves
    # in tick 3), v2 queued after ticks 4, v3 after ticks 3..8.
    assert queued == [0, 0, 0, 1, 2, 1, 1, 1, 1, 0, 0]


def test_two_intersection_travel_times_by_hand(tmp_path):
    # v1 east through both: enters 0, node 1 at 3, node 2 at 6, exits at 9 -> 9 s.
    # v2 west through node 2 then right at node 1 (rights always green): 0 -> 3 -> 6 -> 9 -> 9 s.
    # v3 south through node 2, red until node 2 switches to N-S through at decision 7 (transition
    # ticks 7, 8; credit 0.5 at 9, 1 at 10): queues 3..9, leaves at 10, exits at 13 -> 13 s.
    flow = write_flows(tmp_path / "flow.json", (["road_0_1_0", "road_1_1_0", "road_2_1_0"], 0),
                       (["road_3_1_2", "road_2_1_2", "road_1_1_1"], 0), (["road_2_2_3", "road_2_1_3"], 0))
    env = make_env("traffic_cityflow", 1, roadnet=ROADNET_1X2, flow=flow, decision_seconds=1, yellow_seconds=2,
                   episode_length=30)
    env.reset(seed=0)
    assert env.network.node_ids == ["intersection_1_1", "intersection_2_1"]
    node2_queue = []
    actions = [[0, 0]] * 7 + [[0, 1]] * 7
    run_ticks(env, actions, lambda k, s: node2_queue.append(-s.groups["agents"].reward[0, 1].item() / 0.25))
    assert env.exited.item() == 3 and env.in_network().item() == 0
    assert env.average_travel_time().item() == pytest.approx((9 + 9 + 13) / 3)
    assert node2_queue == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]


# -- invariants ----------------------------------------------------------------------------------------


def random_actions(steps: int, b: int, n: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 8, (b, n), generator=generator) for _ in range(steps)]


def test_conservation_conflicts_and_capacity_every_second():
    env = make_env("traffic_grid_3x3", 2, seed=3, decision_seconds=1, yellow_seconds=2, demand_vph=900,
                   episode_length=400)
    env.reset(seed=3)
    conflict = torch.as_tensor(conflict_matrix())
    non_right = torch.tensor([m != 2 for h in range(4) for m in range(3)])
    previous = {"discharge": torch.zeros_like(env.last_discharge), "queue": env.queue.clone()}
    seen = {"green_pairs": 0, "discharged": 0.0}

    def check(k, step):
        # Conservation: every vehicle generated is on a road, in an entry buffer, or has exited.
        assert torch.equal(env.generated, env.in_network() + env.exited)
        assert (env.queue >= 0).all() and (env.moving >= 0).all() and (env.buffer >= 0).all()
        assert torch.equal(env.occupancy, env.moving.sum((1, 3)) + env.queue.sum(-1))
        # No conflicting movements are green together at any intersection.
        green = env.last_green[:, env.in_road_c].flatten(2)[..., non_right].float()  # [B, N, 8]
        c = conflict[non_right][:, non_right].float()
        assert (torch.einsum("bni,ij,bnj->bn", green, c, green) == 0).all()
        seen["green_pairs"] += int((green.sum(-1) == 2).sum())
        # Discharge: at most ceil(0.5) = 1 vehicle per lane per second, at most 1 in any 2 s
        # (0.5 veh/s), never more than was queued, only on green.
        moved = env.last_discharge
        assert (moved <= 1).all() and (moved + previous["discharge"] <= 1).all()
        assert (moved[~env.last_green] == 0).all()
        seen["discharged"] += moved.sum().item()
        # Capacity of every road (spill-back) holds.
        assert (env.occupancy <= env.capacity).all()
        previous["discharge"] = moved.clone()

    run_ticks(env, random_actions(400, 2, 9, seed=1), check)
    assert seen["green_pairs"] > 0 and seen["discharged"] > 100  # the checks saw real traffic


def test_discharge_follows_a_saturation_flow_above_one():
    # s = 1.5 veh/s: credit 1.5, 2.0, 1.5, ... gives 1, 2, 1, 2, ... vehicles a second from the
    # start of green, 1.5 on average. The eastbound through lane queues for 60 s of N-S green,
    # then gets E-W green after a 5 s transition (ticks 60..64): 30 s of green discharge 45.
    env = make_env("traffic_grid_1x1", 1, seed=0, demand_vph=3600, turn_ratios=(0.0, 1.0, 0.0),
                   saturation_flow=1.5, decision_seconds=1, yellow_seconds=5, episode_length=200)
    env.reset(seed=0)
    lane = env.network.in_road[0, 0]
    moved = []
    for t in range(95):
        env.step({"agents": torch.tensor([[1 if t < 60 else 0]])})
        moved.append(env.last_discharge[0, lane, 1].item())
    assert sum(moved[:65]) == 0 and env.queue[0, lane, 1] > 0  # saturated to the end
    assert moved[65:71] == [1, 2, 1, 2, 1, 2] and sum(moved[65:95]) == 45


def test_spill_back_blocks_discharge_into_a_full_road(tmp_path):
    # Eastbound vehicles every second; node 1 gives E-W through, node 2 stays red for it, and every
    # road holds 3 vehicles: the road between them fills and node 1's through lane stops.
    flow = tmp_path / "flow.json"
    flow.write_text(json.dumps([{"vehicle": {}, "route": ["road_0_1_0", "road_1_1_0", "road_2_1_0"],
                                 "interval": 1.0, "startTime": 0, "endTime": -1}]))
    env = make_env("traffic_cityflow", 1, roadnet=ROADNET_1X2, flow=str(flow), decision_seconds=1,
                   yellow_seconds=0, road_capacity=3, episode_length=100)
    env.reset(seed=0)
    road_in = env.network.road_ids.index("road_0_1_0")
    road_mid = env.network.road_ids.index("road_1_1_0")
    blocked = 0
    for t in range(40):
        # Its vehicles all go straight on at node 2, which is red for them: a full middle road
        # stays full through the next second.
        full = env.occupancy[0, road_mid] == 3 and env.queue[0, road_in, 1] > 0
        env.step({"agents": torch.tensor([[0, 1]])})
        assert (env.occupancy <= 3).all()
        if full:
            assert env.last_discharge[0, road_in, 1] == 0
            blocked += 1
    assert blocked > 20 and env.buffer[0, road_in] > 10  # spill-back reached the entry buffer
    assert env.occupancy[0, road_in] == 3 and env.queue[0, road_mid, 1] == 3
    # Once node 2 turns green, the middle road drains and node 1 discharges again.
    for _ in range(10):
        env.step({"agents": torch.tensor([[0, 0]])})
    assert env.exited.item() > 0
    assert torch.equal(env.generated, env.in_network() + env.exited)


# -- the loader ----------------------------------------------------------------------------------------


def test_cityflow_loader_on_a_small_roadnet_and_flow():
    net = load_cityflow(DATA / "roadnet_1x2.json", DATA / "flow_1x2.json", horizon=100, jam_spacing=7.5,
                        turn_ratios=(0.15, 0.7, 0.15))
    road = {name: r for r, name in enumerate(net.road_ids)}
    assert net.node_ids == ["intersection_1_1", "intersection_2_1"] and net.n_roads == 14
    # Roads arriving at node 0 by heading (0 E, 1 N, 2 W, 3 S) and leaving by direction.
    assert [net.road_ids[r] for r in net.in_road[0]] == ["road_0_1_0", "road_1_0_1", "road_2_1_2", "road_1_2_3"]
    assert [net.road_ids[r] for r in net.out_road[1]] == ["road_2_1_0", "road_2_1_1", "road_2_1_2", "road_2_1_3"]
    assert net.road_end[road["road_1_1_0"]] == 1 and net.road_start[road["road_1_1_0"]] == 0
    assert net.road_end[road["road_2_1_0"]] == -1 and net.road_start[road["road_0_1_0"]] == -1
    # 30 m at min(lane 10, vehicle 8 m/s) = 3.75 -> 4 s. Capacity: 3 lanes x CityFlow's lane length
    # (the road less 10 m at each signalised end) / 7.5 m: 20 m -> 8 vehicles, 10 m between the nodes -> 4.
    assert (net.travel_ticks == 4).all() and (net.length == 30).all() and (net.n_lanes == 3).all()
    assert net.capacity.tolist() == [4 if r == road["road_1_1_0"] or r == road["road_2_1_2"] else 8
                                     for r in range(net.n_roads)]
    assert net.down[road["road_0_1_0"]].tolist() == [road["road_1_1_1"], road["road_1_1_0"], road["road_1_1_3"]]
    # The file's 9 lightphases are the standard table.
    for r in np.flatnonzero(net.road_end >= 0):
        assert (net.phase_green[r] == STANDARD_PHASES[:, net.heading[r], :]).all()
    # Routes -> turning probabilities. Over 100 s, flow A has 5 vehicles (0, 5, .., 20) straight
    # through both nodes, flow B 10 (3, 13, .., 93) whose gap road_0_1_0 -> road_2_1_1 is filled
    # through road_1_1_0 then a left at node 2; flow C one vehicle left, left.
    assert net.turn_probs[road["road_0_1_0"]].tolist() == [0, 1, 0, 0]
    assert net.turn_probs[road["road_1_1_0"]] == pytest.approx([10 / 15, 5 / 15, 0, 0])
    assert net.turn_probs[road["road_2_0_1"]].tolist() == [1, 0, 0, 0]
    assert net.turn_probs[road["road_2_1_2"]].tolist() == [1, 0, 0, 0]
    assert net.turn_probs[road["road_1_1_3"]].tolist() == [0, 0, 0, 1]
    # Generation schedule.
    assert np.flatnonzero(net.schedule[:, road["road_0_1_0"]]).tolist() == sorted(
        [0, 5, 10, 15, 20] + list(range(3, 100, 10)))
    assert np.flatnonzero(net.schedule[:, road["road_2_0_1"]]).tolist() == [7]
    assert net.schedule.sum() == 16
    nbr, mask = net.neighbors()
    assert nbr.tolist() == [[1, 0, 0, 0], [1, 1, 0, 1]] and mask.tolist() == [[True, False, False, False],
                                                                               [False, False, True, False]]


def test_cityflow_env_runs_the_bundled_example_and_routes_finish():
    env = make_env("traffic_cityflow", 2, seed=0)
    assert env.groups["agents"].n_agents == 4 and env.network.schedule is not None
    evaluate(MaxPressurePolicy(env.groups), env, seed=0)
    metrics = env.last_metrics  # of the episode that just ended (the env has auto-reset)
    assert (metrics["vehicles_exited"] > 0).all()
    assert torch.equal(metrics["vehicles_generated"], metrics["vehicles_in_network"] + metrics["vehicles_exited"])
    # The schedule is deterministic: both sub-environments generate the same vehicles (6 flows
    # over 1000 s, intervals 6, 8, 10, 12, 15 from 3 s, 20 from 5 s).
    assert metrics["vehicles_generated"].tolist() == [167 + 125 + 100 + 84 + 67 + 50] * 2


# -- controllers, batching, training -------------------------------------------------------------------


def travel_time(policy_cls, env, seed=0, **kwargs) -> float:
    evaluate(policy_cls(env.groups, **kwargs), env, seed=seed)
    return env.last_metrics["average_travel_time"].mean().item()


def test_max_pressure_beats_fixed_time_under_asymmetric_demand():
    env = make_env("traffic_grid_3x3", 2, seed=0, demand_vph=600, demand_ew_scale=1.0, demand_ns_scale=0.3,
                   episode_length=60)
    fixed = travel_time(FixedTimePolicy, env, green_seconds=30)
    pressure = travel_time(MaxPressurePolicy, env)
    assert pressure < 0.9 * fixed, (pressure, fixed)


def test_fixed_time_cycles_through_its_phases():
    env = make_env("traffic_grid_2x2", 1, seed=0)
    policy = FixedTimePolicy(env.groups, green_seconds=20, phases=(0, 2, 1))
    step = env.reset(seed=0)
    chosen = []
    for _ in range(7):
        action = policy.act({"agents": step.groups["agents"].obs}, {}, explore=False)["agents"]
        chosen.append(action[0, 0].item())
        step = env.step({"agents": action})
    assert chosen == [0, 0, 2, 2, 1, 1, 0]


def test_batched_envs_match_smaller_batches_for_the_same_seed():
    def rollout(b):
        env = make_env("traffic_grid_3x3", b, seed=5, demand_vph=800, episode_length=15)
        policy = MaxPressurePolicy(env.groups)
        step = env.reset(seed=5)
        obs, rewards = [], []
        for _ in range(20):  # through an auto-reset
            step = env.step(policy.act({"agents": step.groups["agents"].obs}, {}, explore=False))
            obs.append(step.groups["agents"].obs)
            rewards.append(step.groups["agents"].reward)
        return torch.stack(obs, 1), torch.stack(rewards, 1), step.state

    obs1, rew1, state1 = rollout(1)
    obs3, rew3, state3 = rollout(3)
    obs2, rew2, _ = rollout(2)
    assert torch.equal(obs1[0], obs3[0]) and torch.equal(rew1[0], rew3[0]) and torch.equal(state1[0], state3[0])
    assert torch.equal(obs2, obs3[:2]) and torch.equal(rew2, rew3[:2])
    assert not torch.equal(obs3[0], obs3[1])  # different sub-environments draw different traffic


def test_spaces_graph_state_and_presets():
    env = make_env("traffic_grid_3x3", 2, seed=0)
    spec = env.groups["agents"]
    assert spec.n_agents == 9 and spec.action_space.n == 8 and spec.graph_k == 4 and env.max_steps == 100
    step = env.reset(seed=0)
    assert step.groups["agents"].obs.shape == (2, 9, spec.obs_dim) and step.state.shape == (2, env.state_dim)
    graph = step.groups["agents"].graph
    # Agent 4 is the centre of the 3 x 3 grid (index y * 3 + x): E, N, W, S neighbours.
    assert graph.neighbors[0, 4].tolist() == [5, 7, 3, 1] and graph.mask[0, 4].all()
    assert graph.neighbors[0, 0].tolist() == [1, 3, 0, 0] and graph.mask[0, 0].tolist() == [True, True, False, False]
    assert graph.mask.sum().item() == 2 * 2 * 12  # 12 grid edges, both ways, 2 envs
    for n in (4, 7, 10, 15, 35):
        entry = vimarl.envs.registry.get_env(f"traffic_grid_{n}x{n}")
        assert dict(entry.defaults) == {"rows": n, "cols": n}
    env = make_env("traffic_grid_35x35", 1, seed=0)
    assert env.groups["agents"].n_agents == 1225 and env.n_roads == 4 * 1225 + 4 * 35


def test_complete_graph_links_every_other_intersection():
    env = make_env("traffic_grid_3x3", 2, seed=0, graph="complete")
    assert env.groups["agents"].graph_k == 8
    graph = env.reset(seed=0).groups["agents"].graph
    assert graph.neighbors.shape == (2, 9, 8) and graph.mask.all()  # K = N - 1, no padding
    for i in range(9):
        row = graph.neighbors[0, i].tolist()
        assert i not in row and sorted(row) == [j for j in range(9) if j != i]
    # Only the graph changes: the same observations, rewards and state as on the road graph.
    road = make_env("traffic_grid_3x3", 2, seed=0)
    road.reset(seed=0)
    for k in range(3):
        action = {"agents": torch.full((2, 9), k)}
        a, b = env.step(action), road.step(action)
        assert torch.equal(a.groups["agents"].obs, b.groups["agents"].obs) and torch.equal(a.state, b.state)
        assert torch.equal(a.groups["agents"].reward, b.groups["agents"].reward)
    assert a.groups["agents"].obs.abs().sum() > 0


def test_road_graph_is_the_default_and_a_bad_graph_is_one_line():
    default = make_env("traffic_grid_3x3", 1, seed=0).graph
    road = make_env("traffic_grid_3x3", 1, seed=0, graph="road")
    assert road.groups["agents"].graph_k == 4
    assert torch.equal(default.neighbors, road.graph.neighbors) and torch.equal(default.mask, road.graph.mask)
    # Corner 8 = (x 2, y 2), slots E, N, W, S: no east or north neighbour (padding, own index),
    # west 7, south 5.
    assert road.graph.neighbors[0, 8].tolist() == [8, 8, 7, 5]
    assert road.graph.mask[0, 8].tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match=r"^graph must be one of road, complete, got 'ring'$"):
        TrafficConfig(graph="ring")
    with pytest.raises(VimarlError, match=r"^env.graph must be one of road, complete, got 'ring'$"):
        resolve("vpp", "traffic_grid_3x3", parse_overrides(["env.graph=ring"]))


def test_vpp_trains_on_the_complete_graph(tmp_path):
    out = vimarl.train("vpp", "traffic_grid_2x2", out=str(tmp_path / "run"), total_steps=200, num_envs=2,
                       warmup_steps=40, update_every=20, gradient_steps=1, batch_size=8, eval_every=200,
                       eval_episodes=2, buffer_size=400, progress=False, tensorboard=False,
                       env_config={"episode_length": 10, "graph": "complete"})
    header, *rows = [row.split(",") for row in (out / "metrics.csv").read_text().splitlines()]
    assert len(rows) == 2 and int(rows[-1][header.index("updates")]) > 0
    assert all(np.isfinite(float(row[header.index("eval_return_mean")])) for row in rows)


def test_checkpoint_state_round_trip_continues_exactly():
    env = make_env("traffic_grid_2x2", 2, seed=1, demand_vph=900)
    policy = MaxPressurePolicy(env.groups)
    step = env.reset(seed=1)
    for _ in range(5):
        step = env.step(policy.act({"agents": step.groups["agents"].obs}, {}, explore=False))
    saved = env.state_dict()
    other = make_env("traffic_grid_2x2", 2, seed=99, demand_vph=900)
    other.load_state_dict(saved)
    action = {"agents": torch.randint(0, 8, (2, 4))}
    a, b = env.step(action), other.step(action)
    assert torch.equal(a.groups["agents"].obs, b.groups["agents"].obs)
    assert torch.equal(a.info["average_travel_time"], b.info["average_travel_time"])


def test_vpp_trains_end_to_end_on_the_3x3_grid(tmp_path):
    out = vimarl.train("vpp", "traffic_grid_3x3", out=str(tmp_path / "run"), total_steps=60, num_envs=2,
                       warmup_steps=20, update_every=10, gradient_steps=1, batch_size=16, eval_every=60,
                       eval_episodes=2, buffer_size=1000, progress=False, tensorboard=False,
                       env_config={"episode_length": 10})
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and all(np.isfinite(float(row.split(",")[5])) for row in rows[1:])


# -- learning, rendering, baselines on the command line, budgets ------------------------------------


@pytest.mark.learning
def test_vpp_beats_fixed_time_on_the_3x3_grid(tmp_path, report):
    # About a minute on one core (42-66 s on the shared 2-core development machine). Settings:
    # episodes of 30 decisions instead of 100 (env.episode_length, 300 simulated seconds; the default
    # 400 veh/h per entry road), 4,800 env steps = 20 episodes of each of 8 sub-environments, 400
    # random warm-up steps, a batch of 64 transitions every 4 env steps (vpp's `--preset cpu` rate),
    # lr 0.003, 64 hidden units (half the paper's, for speed) and entropy weight alpha 0.05 (the
    # paper's 0.2 learned on seeds 0 and 2 but not on seed 1), 8 evaluation episodes. Every policy
    # runs through vimarl.train.evaluate on the trainer's evaluation episodes (same seed).
    # Measured (return / average travel time): seed 0 VPP -501 / 116.5 s, fixed-time -704 / 130.3 s,
    # max-pressure -409 / 111.0 s; seeds 1 and 2 VPP -502 / 118.0 s and -544 / 120.8 s against
    # fixed-time -703 / 131.8 s and -707 / 132.2 s.
    env_config = {"episode_length": 30}
    out = vimarl.train("vpp", "traffic_grid_3x3", out=str(tmp_path / "run"), total_steps=4800, num_envs=8, seed=0,
                       warmup_steps=400, update_every=4, gradient_steps=1, batch_size=64, buffer_size=20000,
                       eval_every=4800, eval_episodes=8, final_eval_episodes=0, progress=False, tensorboard=False,
                       env_config=env_config,
                       algo_config={"lr": 0.003, "hidden_dim": 64, "alpha": 0.05})
    _, algo, _ = load_trained(out)
    seed = eval_seed(0)  # the trainer's first evaluation episodes
    env = make_env("traffic_grid_3x3", 8, seed, **env_config)
    results = {}
    for name, policy in (("vpp", algo), ("fixed-time", FixedTimePolicy(env.groups)),
                         ("max-pressure", MaxPressurePolicy(env.groups))):
        metrics = {}
        returns = evaluate(policy, env, seed, metrics=metrics)["agents"]
        results[name] = (returns.mean().item(), metrics["average_travel_time"].mean().item())
    report("traffic_grid_3x3 (30 decisions), 4,800 env steps, seed 0: return / average travel time: "
           + ", ".join(f"{name} {ret:.0f} / {att:.1f} s" for name, (ret, att) in results.items()))
    (vpp_return, vpp_att), (fixed_return, fixed_att) = results["vpp"], results["fixed-time"]
    assert vpp_att < 0.95 * fixed_att, results
    assert vpp_return > fixed_return + 0.15 * abs(fixed_return), results


def test_render_colours_roads_by_occupancy_and_intersections_by_phase():
    env = make_env("traffic_grid_3x3", 2, seed=0, demand_vph=1800)
    env.reset(seed=0)
    empty = env.render()
    assert empty.dtype == np.uint8 and empty.ndim == 3 and empty.shape[2] == 3 and min(empty.shape[:2]) > 100
    for _ in range(6):  # E-W through everywhere: queues build up on the N-S approaches
        env.step({"agents": torch.zeros(2, 9, dtype=torch.int64)})
    assert env.queue[0].sum() > 0
    busy = env.render()
    assert busy.shape == empty.shape and (busy != empty).any(-1).sum() > 100
    env.occupancy[1] = env.capacity  # only sub-environment 0 is drawn
    assert np.array_equal(env.render(), busy)
    occupancy = env.occupancy[0].clone()
    env.occupancy[0] = env.capacity  # every road full: red
    full = env.render()
    assert (full != busy).any(-1).sum() > 100 and (full == [220, 30, 30]).all(-1).sum() > 100
    env.occupancy[0] = occupancy
    env.phase[0] = 1  # another phase: the intersections change colour, the roads do not
    env.yellow_left[0] = 0
    other = env.render()
    assert 9 <= (other != busy).any(-1).sum() < (full != busy).any(-1).sum()
    assert max(make_env("traffic_grid_35x35", 1).render().shape[:2]) <= 641  # RENDER_SIZE (+1)


def test_render_records_an_episode_gif(tmp_path):
    from vimarl.video import write_gif

    env = make_env("traffic_cityflow", 1, seed=0, episode_length=5)
    frames = []
    evaluate(MaxPressurePolicy(env.groups), env, seed=0, frames=frames)
    assert len(frames) == 6 and all(frame.shape == frames[0].shape for frame in frames)
    assert write_gif(frames, tmp_path / "episode.gif").read_bytes()[:6] == b"GIF89a"


def test_vimarl_eval_runs_the_scripted_controllers(capsys, tmp_path):
    from vimarl.cli import main

    results = {}
    for policy in ("fixed_time", "max_pressure", "uniform"):
        assert main(["eval", "--policy", policy, "traffic_grid_2x2", "--episodes", "2", "--seed", "3"]) == 0
        results[policy] = json.loads(capsys.readouterr().out)
    env = make_env("traffic_grid_2x2", 2, 3)
    metrics = {}
    returns = evaluate(MaxPressurePolicy(env.groups), env, 3, metrics=metrics)["agents"]
    pressure = results["max_pressure"]
    assert pressure["policy"] == "max_pressure" and pressure["episodes"] == 2 and pressure["seed"] == 3
    assert pressure["return_mean"] == pytest.approx(returns.double().mean().item())
    assert pressure["average_travel_time"] == pytest.approx(metrics["average_travel_time"].double().mean().item())
    assert pressure["average_travel_time"] < results["uniform"]["average_travel_time"]
    gif = tmp_path / "fixed.gif"
    assert main(["eval", "--policy", "fixed_time", "traffic_grid_1x1", "--episodes", "1", "--gif", str(gif)]) == 0
    assert json.loads(capsys.readouterr().out)["gif"] == str(gif) and gif.read_bytes()[:6] == b"GIF89a"
    assert main(["eval", "--policy", "max_pressure", "grid_coordination"]) == 2
    assert "is not a traffic env" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["traffic_grid", "traffic_cityflow", "traffic_hangzhou_4x4", "traffic_jinan_3x4",
                                  "traffic_newyork_16x3"] + [f"traffic_grid_{n}x{n}" for n in (1, 2, 3, 4, 7, 10, 15, 35)])
def test_every_traffic_env_has_a_budget_with_the_papers_settings(name):
    from vimarl.config import CONFIG_DIR, resolve

    text = (CONFIG_DIR / "envs" / f"{name}.yaml").read_text()
    assert "100" in text and "1024" in text and "CPU budget" in text
    run = resolve("vpp", name)
    assert run.env_config.episode_length == 100  # the papers' episodes; the budget changes the trainer only
    assert run.train.total_steps >= 2000 and run.train.buffer_size <= 100_000
