"""Traffic-signal control on SUMO through libsumo: the task of `vimarl.envs.traffic` on a
microscopic simulator (docs/traffic.md, "SUMO backend and cross-check").

The interface is the batched model's (`TrafficSignalEnv`): one group "agents", one per
signalised intersection, `Discrete(8)` phases of the standard benchmark table, decisions every
`decision_seconds` with a `yellow_seconds` transition inside the decision when the phase
changes, the 38-value observation, the local queue reward, the E / N / W / S grid graph (or the
complete graph with `graph=complete`), the 10 N + 1 global state and the metrics in
`TimeStep.info`. So the scripted controllers and every algorithm run on both.

- **CityFlow maps.** `roadnet` + `flow` (the `sumo_<city>` envs: `sumo_hangzhou_4x4`, ...)
  convert a CityFlow roadnet and flow file to SUMO (`write_cityflow_net`, `write_cityflow_routes`):
  intersections become nodes (traffic lights where signalised, dead ends where virtual), roads
  edges with their lanes, lane widths, speeds and polyline, laneLinks connections (CityFlow's
  lane 0 is the innermost, SUMO's the outermost), and every flow vehicle a SUMO vehicle on its
  route (gaps filled as the batched model fills them) with the flow's vehicle as its vType.
- **Networks.** `sumo_grid_NxN` builds the batched model's own grid (`grid_network`: same road
  and node ids, 300 m roads, 3 lanes, 11.111 m/s, an entry and an exit road on each open side of
  the border) as SUMO plain XML with one lane per movement (lane 0 right, 1 straight, 2 left)
  and compiles it with SUMO's `netconvert` (netgenerate leaves the lane-to-movement assignment to
  SUMO's heuristics; the batched model has one lane per movement). `sumo_net` takes any `.net.xml` and `.rou.xml`. Networks
  are read with sumolib: the signalised intersections are the traffic lights; an incoming
  lane's movement is the direction of its connections, its approach the heading of the edge.
- **Signals.** Each traffic light gets, for each lightphase 0..8 of the benchmark table, a
  state string built from its controlled links (G for green through / left, g for right turns,
  which yield, r otherwise); the transition shows y on the links green before the change (r
  with `all_red`). States are set with `trafficlight.setRedYellowGreenState`.
- **Demand.** Synthetic (grids): the batched model's demand process, drawn per episode with
  numpy from (seed, sub-environment, episode): each entry road generates a vehicle each second
  with probability demand_vph / 3600 (x the E-W / N-S scales), and its route follows the turning
  ratios at every intersection until it leaves the grid. With `routes`, the file's vehicles.
- **Batches.** libsumo runs one simulation per process. With B = 1 (and no other libsumo
  simulation in this process) it runs in-process; otherwise each sub-environment is a worker
  process (forked; spawned if this process already runs a libsumo simulation, and then scripts
  need the usual `if __name__ == "__main__":` guard) that owns one libsumo simulation, and the B
  workers simulate a decision in parallel. TraCI with labelled connections would do the same
  over sockets, slower.
- **Metrics.** CityFlow's average travel time, as the batched model: vehicle-seconds (running
  vehicles plus those whose departure is due but not yet inserted) / vehicles generated.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import subprocess
import tempfile
import xml.sax.saxutils as xml
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vimarl.envs.base import BatchedEnv, Discrete, GroupSpec, GroupStep
from vimarl.envs.traffic.env import ELAPSED_MAX, ELAPSED_SCALE, OBS_DIM, SignalGridConfig, intersection_graph
from vimarl.envs.traffic.network import (DELTA, LEFT, N_PHASES, RIGHT, STANDARD_PHASES, STRAIGHT, Network,
                                         fill_route, flow_times, grid_network, load_cityflow, read_flows,
                                         read_json)
from vimarl.errors import VimarlError

MOVEMENT_OF_DIRECTION = {"l": LEFT, "L": LEFT, "s": STRAIGHT, "r": RIGHT, "R": RIGHT}
"""sumolib connection directions -> movements (turnarounds 't' are left out)."""
HALTING, VEHICLES = 0x14, 0x10
"""libsumo lane variables: LAST_STEP_VEHICLE_HALTING_NUMBER (speed < 0.1 m/s), LAST_STEP_VEHICLE_NUMBER."""


def sumo_binary(name: str) -> str:
    """A SUMO binary: from the eclipse-sumo wheel (`sumo.SUMO_HOME`), else from $SUMO_HOME/bin. The
    wheel comes first: importing libsumo points SUMO_HOME at sumo_data, which has no binaries."""
    homes = []
    try:
        import sumo

        homes.append(sumo.SUMO_HOME)
    except ImportError:
        pass
    if os.environ.get("SUMO_HOME"):
        homes.append(os.environ["SUMO_HOME"])
    for home in homes:
        path = Path(home) / "bin" / name
        if path.exists():
            return str(path)
    raise VimarlError(f"SUMO binary {name} not found (looked in {homes or 'no SUMO_HOME'}); "
                      f"pip install 'vimarl[sumo]'")


@dataclass
class SumoConfig(SignalGridConfig):
    net: str = ""
    """Path of a SUMO .net.xml; empty: the rows x cols grid."""
    routes: str = ""
    """Path of a SUMO .rou.xml (needed with net); empty: synthetic demand on the grid."""
    roadnet: str = ""
    """Path of a CityFlow roadnet JSON (`cityflow:REL` as in TrafficConfig), converted to a SUMO
    network (needs flow); empty: net, or the grid."""
    flow: str = ""
    """Path of a CityFlow flow JSON, converted to SUMO routes (its vehicles' parameters become the
    vTypes; accel, decel and tau below are for the synthetic demand only)."""
    flow_tau: float = 0.0
    """CityFlow maps: > 0 replaces the flow vehicles' headwayTime (2 s in the public data) as the
    vTypes' tau (1.5: the synthetic demand's vehicle, whose travel times are within 6% of the
    batched model's with saturation_flow 0.5)."""
    accel: float = 2.0
    """Vehicle acceleration (m/s^2) of the synthetic demand's vType (CityFlow's usualPosAcc)."""
    decel: float = 4.5
    """Vehicle deceleration (m/s^2) (CityFlow's usualNegAcc)."""
    tau: float = 1.5
    """Desired time headway in s (CityFlow's headwayTime)."""
    sigma: float = 0.0
    """Krauss driver imperfection (0: deterministic driving, as CityFlow)."""
    time_to_teleport: int = 300
    """SUMO's --time-to-teleport (s a vehicle may be stuck before it is teleported; -1: never)."""
    workers: str = "auto"
    """auto: in-process for B = 1, else one worker process per sub-environment; process: always workers."""

    def __post_init__(self):
        super().__post_init__()
        if self.net and not self.routes:
            raise ValueError("net needs routes (a .rou.xml); synthetic demand is for the grid")
        if self.flow_tau < 0:
            raise ValueError(f"flow_tau must be >= 0, got {self.flow_tau}")
        if bool(self.roadnet) != bool(self.flow):
            raise ValueError("a CityFlow map needs both roadnet and flow")
        if self.roadnet and (self.net or self.routes):
            raise ValueError("give either a CityFlow map (roadnet, flow) or a SUMO one (net, routes), not both")
        if self.workers not in ("auto", "process"):
            raise ValueError(f"workers must be auto or process, got {self.workers!r}")


# -- networks ------------------------------------------------------------------------------------


def write_grid_net(path: Path, rows: int, cols: int, length: float, speed: float) -> Network:
    """Compile the batched model's rows x cols grid into a SUMO network at `path` (netconvert)."""
    net = grid_network(rows, cols, length, speed, 3, 7.5, (1, 1, 1))
    names = {}

    def node_name(i: int, road: int, at_end: bool) -> str:
        if i >= 0:
            return net.node_ids[i]
        x, y = (float(v) for v in net.node_xy[net.road_start[road] if at_end else net.road_end[road]])
        dx, dy = DELTA[net.heading[road]]
        x, y = (x + dx * length, y + dy * length) if at_end else (x - dx * length, y - dy * length)
        name = f"intersection_{round(x / length) + 1}_{round(y / length) + 1}"
        names[name] = (x, y)
        return name

    edges = []
    for r, road in enumerate(net.road_ids):
        edges.append((road, node_name(net.road_start[r], r, False), node_name(net.road_end[r], r, True)))
    nodes = [f'  <node id="{k}" x="{x}" y="{y}" type="traffic_light"/>' for k, (x, y) in
             zip(net.node_ids, net.node_xy.tolist())]
    nodes += [f'  <node id="{k}" x="{x}" y="{y}" type="dead_end"/>' for k, (x, y) in names.items()]
    edge_xml = [f'  <edge id="{e}" from="{a}" to="{b}" numLanes="3" speed="{speed}"/>' for e, a, b in edges]
    lane_of = {RIGHT: 0, STRAIGHT: 1, LEFT: 2}
    conns = [f'  <connection from="{net.road_ids[r]}" to="{net.road_ids[net.down[r, m]]}" '
             f'fromLane="{lane_of[m]}" toLane="{lane_of[m]}"/>'
             for r in range(net.n_roads) for m in (LEFT, STRAIGHT, RIGHT) if net.down[r, m] >= 0]
    _netconvert(path, {"nod": nodes, "edg": edge_xml, "con": conns})
    return net


def _xy(point) -> str:
    return f"{float(point['x']):.2f},{float(point['y']):.2f}"


def write_cityflow_net(roadnet_path: str | Path, path: Path) -> list[str]:
    """Convert a CityFlow roadnet to a SUMO network at `path` (plain XML and netconvert); returns
    the signalised intersections' ids in the batched model's agent order (the roadnet's)."""
    roadnet = read_json(roadnet_path, "roadnet")
    inters = {it["id"]: it for it in roadnet["intersections"]}
    signals = [k for k, it in inters.items() if not it.get("virtual", False) and it.get("roadLinks")]
    nodes = [f'  <node id="{xml.escape(k)}" x="{float(it["point"]["x"])}" y="{float(it["point"]["y"])}" '
             f'type="{"traffic_light" if k in signals else "dead_end"}"/>' for k, it in inters.items()]
    lanes_of, edges = {}, []
    for road in roadnet["roads"]:
        lanes = road.get("lanes") or [{}]
        lanes_of[road["id"]] = len(lanes)
        points = road.get("points") or []
        shape = f' shape="{" ".join(_xy(p) for p in points)}"' if len(points) > 2 else ""
        speeds = [float(lane.get("maxSpeed", 11.111)) for lane in lanes]
        widths = [float(lane.get("width", 3.2)) for lane in lanes]
        attributes = (f'  <edge id="{xml.escape(road["id"])}" from="{xml.escape(road["startIntersection"])}" '
                      f'to="{xml.escape(road["endIntersection"])}" numLanes="{len(lanes)}" speed="{max(speeds)}" '
                      f'width="{widths[0]}"{shape}')
        if len(set(speeds)) > 1 or len(set(widths)) > 1:  # SUMO lane 0 is CityFlow's last (outermost)
            inner = "".join(f'<lane index="{len(lanes) - 1 - k}" speed="{speeds[k]}" width="{widths[k]}"/>'
                            for k in range(len(lanes)))
            edges.append(f"{attributes}>{inner}</edge>")
        else:
            edges.append(f"{attributes}/>")
    conns = []
    for k in signals:
        for link in inters[k]["roadLinks"]:
            a, b = link["startRoad"], link["endRoad"]
            for lane_link in link.get("laneLinks") or []:
                conns.append(f'  <connection from="{xml.escape(a)}" to="{xml.escape(b)}" '
                             f'fromLane="{lanes_of[a] - 1 - int(lane_link["startLaneIndex"])}" '
                             f'toLane="{lanes_of[b] - 1 - int(lane_link["endLaneIndex"])}"/>')
    _netconvert(path, {"nod": nodes, "edg": edges, "con": conns})
    return signals


def write_cityflow_routes(flow_path: str | Path, roadnet_path: str | Path, path: Path, horizon: int,
                          tau: float = 0.0) -> int:
    """Convert a CityFlow flow file to a SUMO route file at `path`: every vehicle generated before
    `horizon` s (startTime, then every interval up to endTime), on its route with gaps filled,
    with its flow's vehicle parameters as vType (accel usualPosAcc, decel usualNegAcc,
    emergencyDecel maxNegAcc, tau headwayTime, length, width, minGap, maxSpeed; no driver
    imperfection; `tau` > 0 replaces headwayTime). Returns the number of vehicles."""
    net = load_cityflow(roadnet_path, None, 1, 7.5, (1, 1, 1))
    road_index = {k: r for r, k in enumerate(net.road_ids)}
    roads = [{"id": k} for k in net.road_ids]
    types: dict[tuple, str] = {}
    vehicles = []
    for flow in read_flows(flow_path):
        v = flow.get("vehicle") or {}
        key = tuple(float(v.get(name, default)) for name, default in (
            ("length", 5.0), ("width", 2.0), ("minGap", 2.5), ("usualPosAcc", 2.0), ("usualNegAcc", 4.5),
            ("maxNegAcc", 4.5), ("maxSpeed", 11.111), ("headwayTime", 2.0)))
        if tau > 0:
            key = key[:-1] + (float(tau),)
        vtype = types.setdefault(key, f"cf{len(types)}")
        names = flow.get("route", [])
        if not names or any(k not in road_index for k in names):
            raise VimarlError(f"flow route {names} names a road missing from {roadnet_path}")
        route = " ".join(net.road_ids[r] for r in fill_route([road_index[k] for k in names], net.down, roads))
        vehicles += [(float(t), vtype, route) for t in flow_times(flow, horizon)]
    vehicles.sort(key=lambda item: item[0])  # SUMO reads route files in departure order
    lines = ["<routes>"]
    for (length, width, min_gap, accel, decel, emergency, speed, tau), name in types.items():
        lines.append(f'  <vType id="{name}" accel="{accel}" decel="{decel}" emergencyDecel="{max(emergency, decel)}" '
                     f'tau="{tau}" sigma="0" length="{length}" width="{width}" minGap="{min_gap}" '
                     f'maxSpeed="{speed}" speedFactor="1" speedDev="0"/>')
    for k, (t, vtype, route) in enumerate(vehicles):
        lines.append(f'  <vehicle id="v{k}" type="{vtype}" depart="{t:.2f}" departLane="best" departSpeed="max">'
                     f'<route edges="{xml.escape(route)}"/></vehicle>')
    lines.append("</routes>")
    path.write_text("\n".join(lines) + "\n")
    return len(vehicles)


def _netconvert(path: Path, files: dict[str, list[str]]) -> None:
    """Compile plain XML (nod, edg, con lines) into the SUMO network `path`."""
    base = path.with_suffix("")
    tags = {"nod": "nodes", "edg": "edges", "con": "connections"}
    for ext, lines in files.items():
        Path(f"{base}.{ext}.xml").write_text(f"<{tags[ext]}>\n" + "\n".join(lines) + f"\n</{tags[ext]}>\n")
    cmd = [sumo_binary("netconvert"), "--node-files", f"{base}.nod.xml", "--edge-files", f"{base}.edg.xml",
           "--connection-files", f"{base}.con.xml", "--no-turnarounds", "true", "--tls.default-type", "static",
           "--offset.disable-normalization", "true", "--no-warnings", "true", "-o", str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise VimarlError(f"netconvert failed: {result.stderr.strip()[-500:]}")


def _heading(shape, at_end: bool) -> int:
    (x0, y0), (x1, y1) = (shape[-2], shape[-1]) if at_end else (shape[0], shape[1])
    return round(math.atan2(y1 - y0, x1 - x0) / (math.pi / 2)) % 4


@dataclass
class SumoLayout:
    """What the simulation workers and the env need to know about a SUMO network (from sumolib)."""

    tls_ids: list[str]
    node_xy: np.ndarray
    lanes: list[str]
    """Every non-internal lane, in a fixed order (subscriptions)."""
    queue_pairs: np.ndarray
    """[P, 2] (slot, lane index): lane counts into slot n * 12 + 3 * heading + movement."""
    out_pairs: np.ndarray
    """[Q, 2] (slot, lane index): lane counts into slot n * 4 + direction of the outgoing edge."""
    link_moves: list[list[tuple[int, int]]]
    """Per traffic light, per controlled link index: (heading, movement), (-1, -1) if unmapped."""
    graph: tuple[np.ndarray, np.ndarray]
    """[N, 4] neighbours by direction and mask, as `Network.neighbors`."""

    @property
    def n_nodes(self) -> int:
        return len(self.tls_ids)


def read_layout(net_path: str, order: list[str] | None = None) -> SumoLayout:
    """Signalised intersections (sorted by id, or in `order`), lanes by (approach, movement) and
    the grid graph of a .net.xml."""
    import sumolib

    net = sumolib.net.readNet(net_path, withPrograms=False)
    rank = {k: i for i, k in enumerate(order or [])}
    tls = sorted(net.getTrafficLights(), key=lambda t: (rank.get(t.getID(), len(rank)), t.getID()))
    if not tls:
        raise VimarlError(f"{net_path} has no traffic light")
    lanes = [lane.getID() for edge in net.getEdges() for lane in edge.getLanes()]
    lane_index = {k: i for i, k in enumerate(lanes)}
    node_of_tls, xy, queue_pairs, out_pairs, link_moves = {}, [], [], [], []
    in_edge = np.full((len(tls), 4), None, dtype=object)
    out_edge = np.full((len(tls), 4), None, dtype=object)
    for n, light in enumerate(tls):
        moves = {}
        for link in light.getLinks().items():
            index, connections = link
            for lane_in, lane_out, _ in connections:
                conn = [c for c in lane_in.getOutgoing() if c.getToLane() == lane_out]
                direction = conn[0].getDirection() if conn else "t"
                movement = MOVEMENT_OF_DIRECTION.get(direction, -1)
                edge = lane_in.getEdge()
                h = _heading(edge.getShape(), True)
                moves[index] = (h, movement) if movement >= 0 else (-1, -1)
                if movement >= 0:
                    pair = (n * 12 + 3 * h + movement, lane_index[lane_in.getID()])
                    if pair not in queue_pairs:
                        queue_pairs.append(pair)
                    in_edge[n, h] = edge
                    out = lane_out.getEdge()
                    d = _heading(out.getShape(), False)
                    if out_edge[n, d] is None:
                        out_edge[n, d] = out
                        out_pairs += [(n * 4 + d, lane_index[lane.getID()]) for lane in out.getLanes()]
                node_of_tls.setdefault(edge.getToNode().getID(), n)
        link_moves.append([moves.get(k, (-1, -1)) for k in range(max(moves, default=-1) + 1)])
        node = next(iter(c[0].getEdge().getToNode() for c in light.getConnections()), None)
        xy.append(node.getCoord() if node is not None else (0.0, 0.0))
    # The graph: direction d holds the traffic light the outgoing edge leads to, else the one
    # the incoming edge from d comes from.
    n_nodes = len(tls)
    nbr, mask = np.tile(np.arange(n_nodes)[:, None], (1, 4)), np.zeros((n_nodes, 4), dtype=bool)
    for i in range(n_nodes):
        for d in range(4):
            j = -1
            if out_edge[i, d] is not None:
                j = node_of_tls.get(out_edge[i, d].getToNode().getID(), -1)
            if j < 0 and in_edge[i, (d + 2) % 4] is not None:
                j = node_of_tls.get(in_edge[i, (d + 2) % 4].getFromNode().getID(), -1)
            if j >= 0 and j != i:
                nbr[i, d], mask[i, d] = j, True
    return SumoLayout([t.getID() for t in tls], np.array(xy, dtype=float), lanes,
                      np.array(queue_pairs, dtype=np.int64).reshape(-1, 2),
                      np.array(out_pairs, dtype=np.int64).reshape(-1, 2), link_moves, (nbr, mask))


def signal_states(link_moves: list[tuple[int, int]], all_red: bool) -> tuple[list[str], list[str]]:
    """The state strings of one traffic light: per lightphase 0..8 (0: the transition, right turns
    only) and, per lightphase 1..8 left, the transition after it (y on its green links)."""
    phases = []
    for p in range(9):
        chars = []
        for h, m in link_moves:
            green = h >= 0 and bool(STANDARD_PHASES[p, h, m]) and not (all_red and p == 0)
            chars.append(("g" if m == RIGHT else "G") if green else "r")
        phases.append("".join(chars))
    transitions = [phases[0]]
    for p in range(1, 9):
        chars = []
        for k, (h, m) in enumerate(link_moves):
            if h >= 0 and m != RIGHT and STANDARD_PHASES[p, h, m]:
                chars.append("r" if all_red else "y")
            else:
                chars.append(phases[0][k])
        transitions.append("".join(chars))
    return phases, transitions


# -- demand --------------------------------------------------------------------------------------


def synthetic_routes(net: Network, config: SumoConfig, horizon: int, rng: np.random.Generator) -> list[tuple]:
    """The batched model's synthetic demand: [(depart second, [road ids])] sorted by departure."""
    entries = net.entry_roads
    ew = net.heading[entries] % 2 == 0
    rate = config.demand_vph / 3600.0 * np.where(ew, config.demand_ew_scale, config.demand_ns_scale)
    spawn = rng.random((horizon, len(entries))) < rate
    ratios = np.asarray(config.turn_ratios, dtype=float)
    vehicles = []
    for t, e in zip(*np.nonzero(spawn)):
        road, route = int(entries[e]), []
        while True:
            route.append(net.road_ids[road])
            if net.road_end[road] < 0:
                break
            valid = net.down[road] >= 0
            probs = np.where(valid, ratios, 0.0)
            road = int(net.down[road, rng.choice(3, p=probs / probs.sum())])
        vehicles.append((int(t), route))
    return vehicles


def write_routes(path: Path, vehicles: list[tuple], config: SumoConfig) -> None:
    c = config
    lines = ['<routes>', f'  <vType id="car" accel="{c.accel}" decel="{c.decel}" tau="{c.tau}" sigma="{c.sigma}" '
             f'length="5" minGap="2.5" maxSpeed="{c.speed}" speedFactor="1" speedDev="0"/>']
    for k, (t, route) in enumerate(vehicles):
        lines.append(f'  <vehicle id="v{k}" type="car" depart="{t}" departLane="best" departSpeed="max">'
                     f'<route edges="{xml.escape(" ".join(route))}"/></vehicle>')
    lines.append('</routes>')
    path.write_text("\n".join(lines) + "\n")


# -- one simulation ------------------------------------------------------------------------------


class SumoSimulation:
    """One libsumo simulation (numpy in, numpy out); lives in the env's process or in a worker."""

    def __init__(self, layout: SumoLayout, net_path: str, config: SumoConfig):
        import libsumo

        self.sumo, self.layout, self.config = libsumo, layout, config
        self.net_path = net_path
        states = [signal_states(moves, config.all_red) for moves in layout.link_moves]
        self.phase_states = [s[0] for s in states]
        self.transition_states = [s[1] for s in states]
        self.started = False
        self.n_lanes = len(layout.lanes)

    def _args(self, routes: str, seed: int) -> list[str]:
        c = self.config
        return [sumo_binary("sumo"), "-n", self.net_path, "-r", routes, "--step-length", "1",
                "--time-to-teleport", str(c.time_to_teleport), "--no-step-log", "true", "--no-warnings", "true",
                "--seed", str(seed % 2**31), "--begin", "0"]

    def reset(self, routes: str, seed: int) -> dict[str, np.ndarray]:
        s = self.sumo
        if self.started:
            s.load(self._args(routes, seed)[1:])
        else:
            s.start(self._args(routes, seed))
            self.started = True
        for lane in self.layout.lanes:
            s.lane.subscribe(lane, [VEHICLES, HALTING])
        self.current = np.zeros(self.layout.n_nodes, dtype=np.int64)  # lightphase shown
        for i, tls in enumerate(self.layout.tls_ids):
            s.trafficlight.setRedYellowGreenState(tls, self.phase_states[i][1])
            self.current[i] = 1
        self.last_phase = np.ones(self.layout.n_nodes, dtype=np.int64)  # lightphase before a transition
        self.yellow_left = np.zeros(self.layout.n_nodes, dtype=np.int64)
        self.vehicle_seconds = self.generated_done = self.exited = self.teleports = 0.0
        self.lane_counts = np.zeros((self.n_lanes, 2))
        return self.observe()

    def _set(self, i: int, state: str) -> None:
        self.sumo.trafficlight.setRedYellowGreenState(self.layout.tls_ids[i], state)

    def decide(self, action: np.ndarray) -> dict[str, np.ndarray]:
        """One decision: set phases, simulate decision_seconds seconds; the queue sum and observation."""
        c, s = self.config, self.sumo
        target = np.asarray(action, dtype=np.int64) + 1
        change = target != self.last_phase
        self.yellow_left = np.where(change, c.yellow_seconds, self.yellow_left)
        for i in np.flatnonzero(change):
            self._set(i, self.transition_states[i][self.last_phase[i]] if c.yellow_seconds > 0
                      else self.phase_states[i][target[i]])
        self.last_phase = target
        queued = np.zeros(self.layout.n_nodes)
        q_slot, q_lane = self.layout.queue_pairs.T
        for _ in range(c.decision_seconds):
            for i in np.flatnonzero(self.yellow_left == 0):
                if self.current[i] != target[i]:
                    self._set(i, self.phase_states[i][target[i]])
                    self.current[i] = target[i]
            self.current[self.yellow_left > 0] = 0
            s.simulationStep()
            self.yellow_left = np.maximum(self.yellow_left - 1, 0)
            self._read_lanes()
            per_slot = np.bincount(q_slot, self.lane_counts[q_lane, 1], minlength=12 * self.layout.n_nodes)
            queued += per_slot.reshape(-1, 12).sum(1)
            self.exited += s.simulation.getArrivedNumber()
            self.generated_done += s.simulation.getDepartedNumber()
            self.teleports += s.simulation.getStartingTeleportNumber()
            pending = len(s.simulation.getPendingVehicles())
            self.pending = pending
            self.vehicle_seconds += s.vehicle.getIDCount() + pending
        out = self.observe()
        out["queued"] = queued
        return out

    def _read_lanes(self) -> None:
        results = self.sumo.lane.getAllSubscriptionResults()
        self.lane_counts = np.array([(results[k][VEHICLES], results[k][HALTING]) for k in self.layout.lanes],
                                    dtype=float).reshape(-1, 2)

    def observe(self) -> dict[str, np.ndarray]:
        n, layout = self.layout.n_nodes, self.layout
        counts = self.lane_counts
        q_slot, q_lane = layout.queue_pairs.T
        o_slot, o_lane = layout.out_pairs.T
        queue = np.bincount(q_slot, counts[q_lane, 1], minlength=12 * n).reshape(n, 12)
        moving = np.bincount(q_slot, counts[q_lane, 0] - counts[q_lane, 1], minlength=12 * n).reshape(n, 12)
        out = np.bincount(o_slot, counts[o_lane, 0], minlength=4 * n).reshape(n, 4)
        pending = getattr(self, "pending", 0)
        running = float(self.sumo.vehicle.getIDCount())
        return {"queue": queue, "approaching": moving, "out": out,
                "metrics": np.array([self.vehicle_seconds, self.generated_done + pending, self.exited,
                                     running + pending, self.teleports, self.sumo.simulation.getTime()])}

    def close(self) -> None:
        if self.started:
            self.sumo.close()
            self.started = False


def _worker(conn, layout, net_path, config) -> None:
    sim = SumoSimulation(layout, net_path, config)
    try:
        while True:
            method, args = conn.recv()
            if method == "close":
                break
            conn.send(getattr(sim, method)(*args))
    except EOFError:
        pass
    finally:
        sim.close()
        conn.close()


_IN_PROCESS = {"owner": None}
"""The env holding this process's libsumo simulation, if any (libsumo runs one per process)."""


# -- the environment -----------------------------------------------------------------------------


class SumoTrafficEnv(BatchedEnv):
    """`TrafficSignalEnv`'s task on SUMO: B libsumo simulations, one per sub-environment."""

    Config = SumoConfig
    state_fields = ()

    def __init__(self, config: SumoConfig, num_envs: int, seed: int = 0, device="cpu"):
        super().__init__(config, num_envs, seed, device)
        c = config
        sumo_binary("sumo")
        self.max_steps = c.episode_length
        self.horizon = c.episode_length * c.decision_seconds
        self._tmp = tempfile.TemporaryDirectory(prefix="vimarl_sumo_")
        self.workdir = Path(self._tmp.name)
        self.city_routes = None
        order = None
        if c.net:
            self.net_path, self.grid = str(Path(c.net).resolve()), None
        elif c.roadnet:
            self.net_path, self.grid = str(self.workdir / "city.net.xml"), None
            order = write_cityflow_net(c.roadnet, Path(self.net_path))
            self.city_routes = self.workdir / "city.rou.xml"
            write_cityflow_routes(c.flow, c.roadnet, self.city_routes, self.horizon, c.flow_tau)
        else:
            self.net_path = str(self.workdir / "grid.net.xml")
            self.grid = write_grid_net(Path(self.net_path), c.rows, c.cols, c.road_length, c.speed)
        self.layout = layout = read_layout(self.net_path, self.grid.node_ids if self.grid else order)
        n = self.n_nodes = layout.n_nodes
        dev = self.device
        self.graph = intersection_graph(c.graph, *layout.graph, num_envs, dev)
        self.groups = {"agents": GroupSpec(n_agents=n, obs_dim=OBS_DIM, action_space=Discrete(N_PHASES),
                                           graph_k=self.graph.k, static_graph=True)}
        self.state_dim = 10 * n + 1
        self.phase = torch.zeros(num_envs, n, dtype=torch.int64, device=dev)
        self.yellow_left = torch.zeros_like(self.phase)
        self.elapsed = torch.zeros_like(self.phase)
        self.last_metrics: dict[str, Tensor] = {}
        self._obs = [None] * num_envs
        self._sims, self._procs, self._pipes = [], [], []
        if c.workers == "auto" and num_envs == 1 and _IN_PROCESS["owner"] is None:
            self._sims = [SumoSimulation(layout, self.net_path, c)]
            _IN_PROCESS["owner"] = self
        else:
            # fork: fast, and works from scripts without a __main__ guard; spawn where this process
            # already runs a libsumo simulation (a forked child would inherit it) or fork is missing.
            fork = _IN_PROCESS["owner"] is None and "fork" in mp.get_all_start_methods()
            ctx = mp.get_context("fork" if fork else "spawn")
            for _ in range(num_envs):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, layout, self.net_path, c), daemon=True)
                proc.start()
                child.close()
                self._procs.append(proc)
                self._pipes.append(parent)

    def _call(self, method: str, args: list[tuple], envs: list[int]) -> list:
        if self._sims:
            return [getattr(self._sims[0], method)(*a) for a in args]
        for b, a in zip(envs, args):
            self._pipes[b].send((method, a))
        return [self._pipes[b].recv() for b in envs]

    def close(self) -> None:
        """Stop the simulations (worker processes) and remove the temporary files."""
        for sim in self._sims:
            sim.close()
        if self._sims and _IN_PROCESS["owner"] is self:
            _IN_PROCESS["owner"] = None
        self._sims = []
        for pipe, proc in zip(self._pipes, self._procs):
            try:
                pipe.send(("close", ()))
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self._pipes, self._procs = [], []
        self._tmp.cleanup()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- episodes --------------------------------------------------------------------------------
    def _routes(self, b: int) -> str:
        c = self.config
        if c.routes:
            return str(Path(c.routes).resolve())
        if self.city_routes is not None:
            return str(self.city_routes)
        episode = int(self.episode_index[b])
        rng = np.random.default_rng([self.seed, b, episode])
        path = self.workdir / f"env{b}.rou.xml"
        write_routes(path, synthetic_routes(self.grid, c, self.horizon, rng), c)
        return str(path)

    def _reset_envs(self, env_mask: Tensor) -> None:
        envs = torch.nonzero(env_mask).flatten().tolist()
        seeds = [hash((self.seed, b, int(self.episode_index[b]))) for b in envs]
        results = self._call("reset", [(self._routes(b), s) for b, s in zip(envs, seeds)], envs)
        for b, result in zip(envs, results):
            self._obs[b] = result
        self.phase[env_mask] = 0
        self.yellow_left[env_mask] = 0
        self.elapsed[env_mask] = 0

    def _step(self, actions: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        c = self.config
        action = actions["agents"].to(self.device, torch.int64)
        change = action != self.phase
        self.yellow_left = torch.where(change, c.yellow_seconds, self.yellow_left)
        self.elapsed = torch.where(change, 0, self.elapsed)
        self.phase = action.clone()
        envs = list(range(self.num_envs))
        results = self._call("decide", [(a,) for a in action.cpu().numpy()], envs)
        self._obs = results
        self.yellow_left = (self.yellow_left - c.decision_seconds).clamp_min(0)
        self.elapsed += c.decision_seconds
        queued = torch.as_tensor(np.stack([r["queued"] for r in results]), dtype=torch.float32, device=self.device)
        self.last_metrics = self.metrics()
        rewards = -c.reward_scale * queued / c.decision_seconds
        return {"agents": rewards}, torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)

    def step(self, actions: dict[str, Tensor]):
        """The base step, with the episode's metrics ([B], before any auto-reset) in info:
        average_travel_time, vehicles_generated, vehicles_exited, vehicles_in_network, teleports."""
        step = super().step(actions)
        step.info.update(self.last_metrics)
        return step

    def metrics(self) -> dict[str, Tensor]:
        m = torch.as_tensor(np.stack([o["metrics"] for o in self._obs]), dtype=torch.float32, device=self.device)
        return {"average_travel_time": m[:, 0] / m[:, 1].clamp_min(1.0), "vehicles_generated": m[:, 1],
                "vehicles_exited": m[:, 2], "vehicles_in_network": m[:, 3], "teleports": m[:, 4]}

    def average_travel_time(self) -> Tensor:
        """[B] CityFlow's average travel time of the current episode so far (as the batched model)."""
        return self.metrics()["average_travel_time"]

    # -- observations ----------------------------------------------------------------------------
    def _observe(self) -> tuple[dict[str, GroupStep], Tensor | None]:
        c, b, n = self.config, self.num_envs, self.n_nodes

        def stack(key):
            return torch.as_tensor(np.stack([o[key] for o in self._obs]), dtype=torch.float32, device=self.device)

        queue, approaching, out = stack("queue"), stack("approaching"), stack("out")
        phase = torch.nn.functional.one_hot(self.phase, N_PHASES).float()
        yellow = (self.yellow_left > 0).float().unsqueeze(-1)
        elapsed = (self.elapsed.clamp(max=ELAPSED_MAX).float() / ELAPSED_SCALE).unsqueeze(-1)
        s = c.obs_scale
        obs = torch.cat([phase, yellow, elapsed, queue * s, approaching * s, out * s], -1)
        per_node = torch.cat([queue.view(b, n, 4, 3).sum(-1) * s, approaching.view(b, n, 4, 3).sum(-1) * s,
                              self.phase.float().unsqueeze(-1) / (N_PHASES - 1), yellow], -1)
        progress = (self.episode_step.float() / self.max_steps).unsqueeze(-1)
        state = torch.cat([per_node.flatten(1), progress], -1)
        zeros = torch.zeros(b, n, device=self.device)
        return {"agents": GroupStep(obs=obs, reward=zeros, graph=self.graph)}, state
