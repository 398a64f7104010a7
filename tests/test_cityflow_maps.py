"""The real-city CityFlow maps (Hangzhou 4 x 4, Jinan 3 x 4, New York 16 x 3) on the batched model
and on SUMO: the loader against the JSON files by hand, the recorded flows, the roadnets' phases,
route following, short episodes, and the SUMO conversion (docs/traffic.md, "Real city maps").

Tests that read ../shared/data/cityflow (or $VIMARL_CITYFLOW_DATA) skip with a one-line reason
when it is absent: a user's checkout has no copy of the data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vimarl.envs.registry import ENVIRONMENTS, make_env
from vimarl.envs.traffic import FixedTimePolicy, MaxPressurePolicy, load_cityflow
from vimarl.envs.traffic.cities import CITIES, COLIGHT_COMMIT, ENV_VAR, data_dir, missing, resolve
from vimarl.envs.traffic.network import MOVEMENT_TYPES, STANDARD_PHASES
from vimarl.errors import VimarlError
from vimarl.train import evaluate

torch.set_num_threads(1)
DATA = Path(__file__).parent / "data"
HANGZHOU = CITIES["hangzhou_4x4"]


def files(city) -> tuple[str, str]:
    return f"cityflow:{city.folder}/{city.roadnet}", f"cityflow:{city.folder}/{city.flow}"


def absent(city) -> str | None:
    """None when the city's roadnet and flow files are readable, else a one-line skip reason."""
    for path in files(city):
        if missing(path):
            return f"CityFlow data absent: no {data_dir() / path.removeprefix('cityflow:')} (docs/traffic.md)"
    return None


def needs(city):
    """Skip (one line) unless the city's roadnet and flow file are readable."""
    return pytest.mark.skipif(absent(city) is not None, reason=absent(city) or "")


NEEDS_SUMO = pytest.mark.skipif(importlib.util.find_spec("libsumo") is None or importlib.util.find_spec("sumo") is None,
                                reason="SUMO is not installed: pip install 'vimarl[sumo]'")
EXPECTED_VEHICLES = {"hangzhou_4x4": 2983, "jinan_3x4": 6295, "newyork_16x3": 2824}
"""Vehicles in each main flow file over its hour (the data folder's README; ENV_SPECS §5.5)."""


def load(city, horizon: int = 3600):
    roadnet, flow = files(city)
    return load_cityflow(roadnet, flow, horizon, jam_spacing=7.5, turn_ratios=(0.15, 0.7, 0.15))


# -- the data folder and its error ---------------------------------------------------------------


def test_missing_data_is_a_one_line_error_naming_the_public_copies(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(VimarlError) as error:
        make_env("traffic_hangzhou_4x4")
    message = str(error.value)
    assert "\n" not in message and "wingsweihua/colight" in message and COLIGHT_COMMIT in message
    assert "data/Hangzhou/4_4/roadnet_4_4.json" in message and ENV_VAR in message
    assert ENVIRONMENTS["traffic_hangzhou_4x4"].missing_data() == message
    # env.roadnet / env.flow override the data folder altogether.
    env = make_env("traffic_hangzhou_4x4", roadnet=str(DATA / "roadnet_1x2.json"), flow=str(DATA / "flow_1x2.json"))
    assert env.n_nodes == 2
    # A copy elsewhere is found through the environment variable.
    (tmp_path / "hangzhou").mkdir()
    (tmp_path / "hangzhou" / "roadnet_4_4.json").write_text("{}")
    assert resolve("cityflow:hangzhou/roadnet_4_4.json") == tmp_path / "hangzhou" / "roadnet_4_4.json"


# -- the loader on the Hangzhou map, by hand -------------------------------------------------------


@needs(HANGZHOU)
def test_hangzhou_roads_lanes_lengths_and_speeds_match_the_json():
    net = load(HANGZHOU)
    assert net.n_nodes == 16 and net.n_roads == 80
    # Agents in the roadnet's order of its non-virtual intersections (x-major in this file).
    assert net.node_ids == [f"intersection_{x}_{y}" for x in range(1, 5) for y in range(1, 5)]
    road = {name: r for r, name in enumerate(net.road_ids)}
    # Checked in roadnet_4_4.json by hand: (points, 3 lanes of maxSpeed 11.111, end intersections).
    # road_0_1_0: (-800, 0) -> (0, 0), virtual intersection_0_1 -> intersection_1_1 (width 15):
    # 800 m, lane 785 m -> 3 x 785 / 7.5 = 314 vehicles, 800 / 11.111 = 72 s.
    # road_1_1_1: (0, 0) -> (0, 600) between two signalised intersections: lane 570 m -> 228, 54 s.
    # road_1_4_1: (0, 1800) -> (0, 2400) into the virtual intersection_1_5: lane 585 m -> 234, 54 s.
    for name, length, capacity, ticks, start, end in (("road_0_1_0", 800, 314, 72, -1, 0),
                                                      ("road_1_1_1", 600, 228, 54, 0, 1),
                                                      ("road_1_4_1", 600, 234, 54, 3, -1)):
        r = road[name]
        assert net.length[r] == length and net.n_lanes[r] == 3 and net.speed[r] == pytest.approx(11.111)
        assert net.capacity[r] == pytest.approx(capacity) and net.travel_ticks[r] == ticks
        assert (net.road_start[r], net.road_end[r]) == (start, end)
    # E-W roads are 800 m, N-S roads 600 m (ENV_SPECS §5.5); one lane per movement (laneLinks).
    assert sorted(set(net.length.tolist())) == [600, 800]
    assert (net.length[net.heading % 2 == 0] == 800).all() and (net.length[net.heading % 2 == 1] == 600).all()
    assert (net.movement_lanes == 1).all()
    # The 16 virtual intersections are boundary nodes: 16 entry and 16 exit roads, every
    # signalised intersection has a road arriving and leaving in each of the 4 directions.
    assert len(net.entry_roads) == 16 and ((net.road_end < 0).sum()) == 16
    assert (net.in_road >= 0).all() and (net.out_road >= 0).all()
    assert net.down[road["road_0_1_0"]].tolist() == [road["road_1_1_1"], road["road_1_1_0"], road["road_1_1_3"]]


@pytest.mark.parametrize("city", CITIES.values(), ids=CITIES)
def test_phases_are_the_roadnets_own(city):
    if reason := absent(city):
        pytest.skip(reason)
    net = load_cityflow(files(city)[0], None, 10, 7.5, (0.15, 0.7, 0.15))
    roadnet = json.loads(resolve(files(city)[0]).read_text())
    road = {name: r for r, name in enumerate(net.road_ids)}
    signals = [it for it in roadnet["intersections"] if not it["virtual"]]
    assert len(signals) == net.n_nodes == city.intersections and net.phases_from_file.all()
    for it in signals:
        phases = it["trafficLight"]["lightphases"]
        assert len(phases) == 9
        incoming = np.flatnonzero(net.road_end == net.node_ids.index(it["id"]))
        for p, phase in enumerate(phases):
            from_file = {(road[it["roadLinks"][k]["startRoad"]], MOVEMENT_TYPES[it["roadLinks"][k]["type"]])
                         for k in phase["availableRoadLinks"]}
            from_net = {(int(r), m) for r in incoming for m in range(3) if net.phase_green[r, p, m]}
            assert from_net == from_file, (it["id"], p)
    # ... and they are the standard benchmark table (ENV_SPECS §5.4), which the controllers assume.
    for r in np.flatnonzero(net.road_end >= 0):
        assert (net.phase_green[r] == STANDARD_PHASES[:, net.heading[r], :]).all()


@pytest.mark.parametrize("city", CITIES.values(), ids=CITIES)
def test_recorded_flows_vehicle_counts_and_routes(city):
    if reason := absent(city):
        pytest.skip(reason)
    net = load(city)
    assert net.schedule.sum() == EXPECTED_VEHICLES[city.name]
    routes = net.routes
    assert routes.schedule.sum() == EXPECTED_VEHICLES[city.name]
    assert np.array_equal(routes.schedule.sum(0) > 0, np.ones(len(routes.start), dtype=bool))
    # Every distinct route of the file is a chain of classes, road by road, ending in an end class.
    flows = json.loads(resolve(files(city)[1]).read_text())
    road = {name: r for r, name in enumerate(net.road_ids)}
    chains = set()
    for k, c in enumerate(routes.start):
        chain = [int(routes.road[c])]
        while routes.move[c] != 3:
            assert net.down[routes.road[c], routes.move[c]] == routes.road[routes.next[c]]
            c = routes.next[c]
            chain.append(int(routes.road[c]))
        chains.add(tuple(chain))
    assert chains == {tuple(road[name] for name in flow["route"]) for flow in flows}  # no gaps in these files
    # Generation: one vehicle per flow entry at its startTime (startTime = endTime in real data).
    first = np.zeros(3600)
    np.add.at(first, [int(f["startTime"]) for f in flows], 1)
    assert np.array_equal(net.schedule.sum(1), first)


# -- the environments ------------------------------------------------------------------------------


@pytest.mark.parametrize("city", CITIES.values(), ids=CITIES)
def test_a_short_episode_on_each_city_has_finite_metrics(city):
    if reason := absent(city):
        pytest.skip(reason)
    env = make_env(f"traffic_{city.name}", 2, seed=0, episode_length=12)
    assert env.groups["agents"].n_agents == city.intersections and env.routes is not None
    metrics = {}
    returns = evaluate(MaxPressurePolicy(env.groups), env, seed=0, metrics=metrics)
    assert torch.isfinite(returns["agents"]).all() and (returns["agents"] <= 0).all()
    for value in metrics.values():
        assert torch.isfinite(value).all()
    flows = json.loads(resolve(files(city)[1]).read_text())
    assert metrics["vehicles_generated"].tolist() == [sum(f["startTime"] < 120 for f in flows)] * 2
    assert torch.equal(metrics["vehicles_generated"], metrics["vehicles_in_network"] + metrics["vehicles_exited"])
    assert (metrics["average_travel_time"] > 0).all()


@needs(CITIES["jinan_3x4"])
def test_class_counts_add_up_to_the_road_counts_every_second():
    env = make_env("traffic_jinan_3x4", 2, seed=1, decision_seconds=1, yellow_seconds=2, episode_length=300)
    env.reset(seed=1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(240):
        env.step({"agents": torch.randint(0, 8, (2, env.n_nodes), generator=generator)})
        assert torch.equal(env.generated, env.in_network() + env.exited)
        per_class = env._by_choice(env.queue_c)
        assert torch.equal(per_class[..., :3], env.queue) and (per_class[..., 3] == 0).all()
        assert torch.equal(env._by_choice(env.buffer_c).sum(-1), env.buffer)
        assert torch.equal(env._by_choice(env.moving.sum(1)), env.approaching)
        assert torch.equal(env.occupancy, env.approaching.sum(-1) + env.queue.sum(-1))
        assert (env.occupancy <= env.capacity).all() and (env.queue_c >= 0).all()
    assert env.exited.min() > 20  # the checks saw vehicles cross the map


def write_flows(path: Path, *flows) -> str:
    vehicle = {"length": 5.0, "width": 2.0, "maxPosAcc": 2.0, "maxNegAcc": 4.5, "usualPosAcc": 2.0,
               "usualNegAcc": 4.5, "minGap": 2.5, "maxSpeed": 11.111, "headwayTime": 2}
    path.write_text(json.dumps([{"vehicle": vehicle, "route": route, "interval": interval, "startTime": start,
                                 "endTime": end} for route, start, end, interval in flows]))
    return str(path)


@pytest.mark.parametrize("route_model", ["vehicle", "turns"])
def test_vehicles_follow_their_own_routes(tmp_path, route_model):
    # Two intersections; A: east straight through both, C: north, right at node 1, left at node 2.
    # Both use road_1_1_0 (node 1 -> node 2): vehicles following their routes leave A's by the
    # east exit and C's by the north exit of node 2; with per-road turning probabilities (turns)
    # each vehicle on road_1_1_0 goes straight with probability 8 / 12, so the counts mix.
    flow = write_flows(tmp_path / "flow.json", (["road_0_1_0", "road_1_1_0", "road_2_1_0"], 0, 70, 10),
                       (["road_1_0_1", "road_1_1_0", "road_2_1_1"], 5, 60, 5))
    env = make_env("traffic_cityflow", 4, seed=0, roadnet=str(DATA / "roadnet_1x2.json"), flow=flow,
                   decision_seconds=1, yellow_seconds=0, episode_length=300, route_model=route_model)
    env.reset(seed=0)
    road = {name: r for r, name in enumerate(env.network.road_ids)}
    exits = torch.zeros(4, env.n_roads)
    for t in range(200):  # alternate E-W and N-S through phases at node 1, E-W through / left at node 2
        env.step({"agents": torch.tensor([[0 if t % 20 < 10 else 1, 0 if t % 20 < 10 else 2]]).expand(4, 2)})
        exits += env.last_exit
    assert env.exited.tolist() == [20] * 4 and env.in_network().tolist() == [0] * 4
    east, north = exits[:, road["road_2_1_0"]], exits[:, road["road_2_1_1"]]
    if route_model == "vehicle":
        assert east.tolist() == [8] * 4 and north.tolist() == [12] * 4
    else:
        assert (east + north).tolist() == [20] * 4 and east.tolist() != [8] * 4


# -- the SUMO backend ---------------------------------------------------------------------------------


@NEEDS_SUMO
@needs(HANGZHOU)
def test_hangzhou_on_sumo_matches_the_batched_map_and_travel_time():
    import sumolib

    from vimarl.envs.external.sumo import SumoTrafficEnv

    batched = make_env("traffic_hangzhou_4x4", 2, seed=0, episode_length=100)
    # tau 1.5 s (env.flow_tau): the vehicle of the grid cross-check, whose discharge matches the
    # batched model's saturation flow of 0.5 veh/s (docs/traffic.md: with the flows' own headway of
    # 2 s SUMO discharges more slowly and its hour-long travel times are 15% longer, a gap by design).
    sumo = make_env("sumo_hangzhou_4x4", 1, seed=0, episode_length=100, flow_tau=1.5)
    try:
        assert isinstance(sumo, SumoTrafficEnv)
        assert sumo.layout.tls_ids == batched.network.node_ids and sumo.groups == batched.groups
        assert torch.equal(sumo.graph.neighbors[:1], batched.graph.neighbors[:1])
        assert torch.equal(sumo.graph.mask[:1], batched.graph.mask[:1])
        assert sorted(set(sumo.layout.queue_pairs[:, 0].tolist())) == list(range(16 * 12))
        net = sumolib.net.readNet(sumo.net_path)
        for name in ("road_0_1_0", "road_1_1_1"):
            edge = net.getEdge(name)
            r = batched.network.road_ids.index(name)
            assert edge.getLaneNumber() == 3 and edge.getSpeed() == pytest.approx(11.11, abs=0.01)
            # SUMO's lanes stop at its junction shapes; CityFlow's at the intersection width (15 m).
            ends = int(batched.network.road_start[r] >= 0) + int(batched.network.road_end[r] >= 0)
            lane_length = batched.network.length[r] - 15 * ends
            assert edge.getLength() == pytest.approx(lane_length, abs=10)
        # Left turns leave from CityFlow's lane 0 (innermost) = SUMO's lane 2 (outermost is 0).
        lanes = net.getEdge("road_0_1_0").getLanes()
        assert {c.getDirection() for c in lanes[2].getOutgoing()} == {"l"}
        assert {c.getDirection() for c in lanes[0].getOutgoing()} == {"r"}
        metrics_b, metrics_s = {}, {}
        evaluate(FixedTimePolicy(batched.groups), batched, seed=0, metrics=metrics_b)
        evaluate(FixedTimePolicy(sumo.groups), sumo, seed=0, metrics=metrics_s)
        assert metrics_s["vehicles_generated"].item() == metrics_b["vehicles_generated"][0].item() == 952
        gap = metrics_s["average_travel_time"].item() / metrics_b["average_travel_time"].mean().item() - 1
        # The same 15% as the grid cross-check (tests/test_sumo.py); measured: -0.1% over 1,000 s,
        # +6% over the hour (docs/traffic.md).
        assert abs(gap) < 0.15, gap
    finally:
        sumo.close()
