"""Road networks for the traffic model: a synthetic grid builder and a CityFlow JSON loader (the
real-city maps' files: `vimarl.envs.traffic.cities`).

A `Network` is plain numpy data read once at construction; the environment turns it into
tensors. Conventions (CityFlow's, ENV_SPECS §5.2 / §5.4):

- directions / headings: 0 = east (+x), 1 = north (+y), 2 = west (-x), 3 = south (-y). The
  heading of a road is the direction it travels in where it ends.
- movements of an incoming road: 0 = left, 1 = straight (through), 2 = right; the traffic model
  adds a fourth choice, 3 = "end", for vehicles that leave the network at the end of the road
  (every vehicle on a road into a boundary node; route ends inside the network for loaded flows).
- a left turn from heading h leaves in direction h + 1, straight in h, right in h - 1 (mod 4).
- lightphases 0..8 as in every benchmark roadnet: 0 = right turns only (the transition/yellow
  phase), 1 = E-W through, 2 = N-S through, 3 = E-W left, 4 = N-S left, 5..8 = through + left of
  one approach (headings 0, 2, 1, 3). Right turns are green in every phase. Action a of an agent
  selects lightphase a + 1.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vimarl.errors import VimarlError

LEFT, STRAIGHT, RIGHT, END = 0, 1, 2, 3
MOVEMENT_TYPES = {"turn_left": LEFT, "go_straight": STRAIGHT, "turn_right": RIGHT}
N_PHASES = 8
"""Signal phases an agent chooses from (lightphases 1..8)."""
DELTA = ((1, 0), (0, 1), (-1, 0), (0, -1))


def turn_direction(heading: int, movement: int) -> int:
    """The direction a vehicle arriving with `heading` leaves in after `movement`."""
    return (heading + (1, 0, 3)[movement]) % 4


def standard_phases() -> np.ndarray:
    """[9, 4, 3] bool: green movements (by incoming heading, movement) of lightphases 0..8."""
    green = np.zeros((9, 4, 3), dtype=bool)
    green[:, :, RIGHT] = True  # right turns in every phase, the transition phase 0 included
    for h in (0, 2):
        green[1, h, STRAIGHT] = True
        green[3, h, LEFT] = True
    for h in (1, 3):
        green[2, h, STRAIGHT] = True
        green[4, h, LEFT] = True
    for phase, h in zip((5, 6, 7, 8), (0, 2, 1, 3)):
        green[phase, h, STRAIGHT] = green[phase, h, LEFT] = True
    return green


STANDARD_PHASES = standard_phases()


@dataclass
class RouteTable:
    """The routes of a flow file as route-suffix classes, for the model in which every vehicle
    follows its own route (`TrafficConfig.route_model = "vehicle"`, docs/traffic.md).

    A vehicle's class is what remains of its route, its current road included: class c is on road
    `road[c]`, turns `move[c]` (left, straight, right, or 3 = end: the route ends on this road) at
    its end and is then of class `next[c]` (-1 after the end). Vehicles of the same class are
    interchangeable. Classes are sorted by (road, move), so the classes of one lane (or one road)
    are contiguous."""

    road: np.ndarray
    """[C] the road of each class."""
    move: np.ndarray
    """[C] the movement at the end of that road (0 left, 1 straight, 2 right, 3 end)."""
    next: np.ndarray
    """[C] the class after the movement; -1 for end classes."""
    start: np.ndarray
    """[K] the class (full route) a vehicle of each distinct route starts in."""
    schedule: np.ndarray
    """[T, K] vehicles of each distinct route generated in each second."""

    @property
    def n_classes(self) -> int:
        return len(self.road)


@dataclass
class Network:
    """A road network with N signalised intersections (the agents) and R directed roads."""

    node_ids: list[str]
    node_xy: np.ndarray
    """[N, 2] float coordinates (metres)."""
    road_ids: list[str]
    road_end: np.ndarray
    """[R] index of the signalised intersection the road leads into, -1 for a boundary node."""
    road_start: np.ndarray
    """[R] index of the signalised intersection the road leaves, -1 for a boundary node."""
    heading: np.ndarray
    """[R] direction of travel where the road ends (0 E, 1 N, 2 W, 3 S)."""
    travel_ticks: np.ndarray
    """[R] free-flow travel time in seconds (>= 1)."""
    capacity: np.ndarray
    """[R] vehicles the road holds (lanes x length / jam spacing)."""
    down: np.ndarray
    """[R, 3] the road each movement (left, straight, right) leads to, -1 where none."""
    turn_probs: np.ndarray
    """[R, 4] probability of each choice (left, straight, right, end) for a vehicle entering the road."""
    phase_green: np.ndarray
    """[R, 9, 3] bool: movement m of road r is green under lightphase p of its end intersection."""
    in_road: np.ndarray
    """[N, 4] the road arriving with each heading, -1 where none."""
    out_road: np.ndarray
    """[N, 4] the road leaving in each direction, -1 where none."""
    schedule: np.ndarray | None = None
    """[T, R] vehicles generated on each road in each second (from a flow file); None: synthetic."""
    length: np.ndarray | None = None
    """[R] road length in metres (CityFlow: along the road's points, intersection centre to centre)."""
    speed: np.ndarray | None = None
    """[R] free-flow speed in m/s (CityFlow: the slowest lane's maxSpeed, capped by the flows' vehicles)."""
    n_lanes: np.ndarray | None = None
    """[R] lanes of the road."""
    movement_lanes: np.ndarray | None = None
    """[R, 3] lanes that serve each movement (left, straight, right): CityFlow's distinct start lanes
    of the movement's laneLinks; None: one lane per movement (grids)."""
    phases_from_file: np.ndarray | None = None
    """[N] bool: the intersection's lightphases were read from the roadnet (it has 9); False: the
    standard table by heading."""
    routes: RouteTable | None = None
    """The flow file's vehicle routes, for the route-following model (`TrafficConfig.route_model`)."""

    @property
    def n_nodes(self) -> int:
        return len(self.node_ids)

    @property
    def n_roads(self) -> int:
        return len(self.road_ids)

    @property
    def entry_roads(self) -> np.ndarray:
        """Roads that start at a boundary node and end at a signalised one."""
        return np.flatnonzero((self.road_start < 0) & (self.road_end >= 0))

    def neighbors(self) -> tuple[np.ndarray, np.ndarray]:
        """[N, 4] adjacent signalised intersection in each direction (padding: own index) and
        its mask. Direction d holds the end of the road leaving in d, or else the start of the
        road arriving from d."""
        n = self.n_nodes
        nbr = np.tile(np.arange(n)[:, None], (1, 4))
        mask = np.zeros((n, 4), dtype=bool)
        for i in range(n):
            for d in range(4):
                out, inc = self.out_road[i, d], self.in_road[i, (d + 2) % 4]
                j = self.road_end[out] if out >= 0 else -1
                if j < 0 and inc >= 0:
                    j = self.road_start[inc]
                if j >= 0 and j != i:
                    nbr[i, d], mask[i, d] = j, True
        return nbr, mask


def _default_turns(down: np.ndarray, road_end: np.ndarray, ratios) -> np.ndarray:
    probs = np.zeros((len(road_end), 4))
    ratios = np.asarray(ratios, dtype=float)
    for r in range(len(road_end)):
        valid = down[r] >= 0
        if road_end[r] < 0 or not valid.any() or ratios[valid].sum() <= 0:
            probs[r, END] = 1.0
        else:
            probs[r, :3] = np.where(valid, ratios, 0.0) / ratios[valid].sum()
    return probs


def grid_network(rows: int, cols: int, length: float, speed: float, lanes: int, jam_spacing: float,
                 turn_ratios) -> Network:
    """A rows x cols grid of signalised intersections, every pair of neighbours linked by a road
    each way, plus an entry and an exit road on each open side of the border intersections
    (boundary nodes as in CityFlow's grid generator). Intersection (x, y) has index y * cols + x."""
    n = rows * cols
    xy = np.array([(x, y) for y in range(rows) for x in range(cols)], dtype=float) * length

    def node(x, y):
        return y * cols + x if 0 <= x < cols and 0 <= y < rows else -1

    start, end, heading, names = [], [], [], []
    for i in range(n):  # out roads: road 4 i + d leaves i in direction d
        x, y = i % cols, i // cols
        for d, (dx, dy) in enumerate(DELTA):
            start.append(i)
            end.append(node(x + dx, y + dy))
            heading.append(d)
            names.append(f"road_{x + 1}_{y + 1}_{d}")  # CityFlow names, virtual ring at 0 / n + 1
    in_road = np.full((n, 4), -1)
    for i in range(n):
        x, y = i % cols, i // cols
        for h, (dx, dy) in enumerate(DELTA):
            j = node(x - dx, y - dy)
            if j >= 0:
                in_road[i, h] = 4 * j + h
            else:  # an entry road from the boundary node
                in_road[i, h] = len(start)
                start.append(-1)
                end.append(i)
                heading.append(h)
                names.append(f"road_{x - dx + 1}_{y - dy + 1}_{h}")
    start, end, heading = np.array(start), np.array(end), np.array(heading)
    out_road = np.arange(4 * n).reshape(n, 4)
    r_count = len(start)
    down = np.full((r_count, 3), -1)
    green = np.zeros((r_count, 9, 3), dtype=bool)
    for r in range(r_count):
        if end[r] >= 0:
            for m in range(3):
                down[r, m] = out_road[end[r], turn_direction(heading[r], m)]
            green[r] = STANDARD_PHASES[:, heading[r], :]
    ticks = np.full(r_count, max(1, round(length / speed)))
    capacity = np.full(r_count, max(1.0, lanes * length / jam_spacing))
    return Network([f"intersection_{i % cols + 1}_{i // cols + 1}" for i in range(n)], xy, names, end, start,
                   heading, ticks, capacity, down, _default_turns(down, end, turn_ratios), green, in_road, out_road,
                   length=np.full(r_count, float(length)), speed=np.full(r_count, float(speed)),
                   n_lanes=np.full(r_count, lanes))


# -- CityFlow files -------------------------------------------------------------------------------


def _direction(a, b) -> int:
    angle = math.atan2(b["y"] - a["y"], b["x"] - a["x"])
    return round(angle / (math.pi / 2)) % 4


def read_json(path: str | Path, what: str):
    from vimarl.envs.traffic.cities import resolve

    path = resolve(path)
    try:
        return json.loads(Path(path).read_text())
    except OSError as error:
        raise VimarlError(f"cannot read the CityFlow {what} file {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise VimarlError(f"CityFlow {what} file {path} is not valid JSON (line {error.lineno})") from None


def read_flows(flow_path: str | Path) -> list[dict]:
    """The flows of a CityFlow flow JSON (a list of {vehicle, route, interval, startTime, endTime})."""
    flows = read_json(flow_path, "flow")
    if not isinstance(flows, list):
        raise VimarlError(f"{flow_path} is not a CityFlow flow file (a list of flows)")
    return flows


def flow_times(flow: dict, horizon: float | None = None) -> np.ndarray:
    """The generation times (s) of one flow, as CityFlow: startTime, then every `interval` s while
    the time is <= endTime (-1: forever), before `horizon` (None: endTime must be finite)."""
    interval = float(flow.get("interval", 1.0))
    start_time, end_time = float(flow.get("startTime", 0)), float(flow.get("endTime", -1))
    if end_time < 0 and horizon is None:
        raise VimarlError("a flow with endTime -1 (forever) needs a horizon")
    last = end_time if end_time >= 0 else math.inf
    if horizon is not None:
        last = min(last, horizon - 1)
    if interval <= 0 or start_time > last:
        times = np.array([start_time]) if start_time <= last else np.zeros(0)
    else:
        times = np.arange(start_time, last + 1e-9, interval)
    return times if horizon is None else times[times < horizon]


def load_cityflow(roadnet_path: str | Path, flow_path: str | Path | None, horizon: int, jam_spacing: float,
                  turn_ratios, speed_override: float = 0.0) -> Network:
    """A Network from a CityFlow roadnet JSON and (optionally) a flow JSON (docs/traffic.md,
    "CityFlow maps: what is read").

    Paths starting with `cityflow:` are read from the CityFlow data folder
    (`vimarl.envs.traffic.cities`). Signalised intersections are the non-virtual ones that have road
    links; virtual ones (and any without road links) are boundary nodes. Per road: its lanes, its
    length along its points, its speed (the slowest lane's maxSpeed, capped by the flows' vehicles'
    maxSpeed; `speed_override` > 0 replaces it), free-flow travel time length / speed and capacity
    lanes x lane length / `jam_spacing`, the lane length being CityFlow's (the points less the width
    of each non-virtual end intersection). Movements come from the roadLinks (type -> left /
    straight / right), the lanes of each from the start lanes of its laneLinks; the 9 lightphases
    from the file when it has exactly 9 (the benchmark layout), else the standard table by heading.
    The flow file gives a per-second generation schedule over `horizon` seconds, the route of every
    vehicle (`Network.routes`) and, from the same routes, per-road turning probabilities (the share
    of route vehicles on road r whose next road is each movement's, or whose route ends on r).
    Without a flow file, entry roads get synthetic demand and turns follow `turn_ratios`.
    """
    roadnet = read_json(roadnet_path, "roadnet")
    try:
        inters = {it["id"]: it for it in roadnet["intersections"]}
        roads = roadnet["roads"]
    except (KeyError, TypeError):
        raise VimarlError(f"{roadnet_path} is not a CityFlow roadnet (needs 'intersections' and "
                          f"'roads')") from None
    signal_ids = [k for k, it in inters.items() if not it.get("virtual", False) and it.get("roadLinks")]
    if not signal_ids:
        raise VimarlError(f"{roadnet_path} has no signalised (non-virtual) intersection with road links")
    node_index = {k: i for i, k in enumerate(signal_ids)}
    road_index = {road["id"]: r for r, road in enumerate(roads)}
    n, r_count = len(signal_ids), len(roads)

    vehicle_speed = math.inf
    flows = None
    if flow_path:
        flows = read_flows(flow_path)
        for flow in flows:
            vehicle_speed = min(vehicle_speed, float((flow.get("vehicle") or {}).get("maxSpeed", math.inf)))

    start, end, heading, start_dir = (np.full(r_count, -1) for _ in range(4))
    ticks = np.ones(r_count, dtype=int)
    capacity, length, speed = np.ones(r_count), np.zeros(r_count), np.zeros(r_count)
    n_lanes = np.ones(r_count, dtype=int)
    for r, road in enumerate(roads):
        for key in ("startIntersection", "endIntersection"):
            if road.get(key) not in inters:
                raise VimarlError(f"road {road.get('id')} of {roadnet_path} names a missing {key} {road.get(key)!r}")
        a, b = inters[road["startIntersection"]], inters[road["endIntersection"]]
        start[r] = node_index.get(a["id"], -1)
        end[r] = node_index.get(b["id"], -1)
        points = road.get("points") or [a["point"], b["point"]]
        heading[r] = _direction(points[-2], points[-1])
        start_dir[r] = _direction(points[0], points[1])
        length[r] = sum(math.dist((p["x"], p["y"]), (q["x"], q["y"])) for p, q in itertools.pairwise(points))
        # CityFlow's lanes stop short of each non-virtual intersection by its width (Road::initLanesPoints).
        trim = sum(float(it.get("width", 0.0)) for it in (a, b) if not it.get("virtual", False))
        lane_length = max(length[r] - trim, jam_spacing)
        lanes = road.get("lanes") or [{}]
        n_lanes[r] = len(lanes)
        speed[r] = speed_override or min(min(float(lane.get("maxSpeed", 11.111)) for lane in lanes), vehicle_speed)
        ticks[r] = max(1, round(length[r] / speed[r]))
        capacity[r] = max(1.0, len(lanes) * lane_length / jam_spacing)

    down = np.full((r_count, 3), -1)
    movement_lanes = np.zeros((r_count, 3), dtype=int)
    green = np.zeros((r_count, 9, 3), dtype=bool)
    in_road, out_road = np.full((n, 4), -1), np.full((n, 4), -1)
    for r in range(r_count):
        for node_of, direction, table, what in ((end, heading, in_road, "arriving with heading"),
                                                (start, start_dir, out_road, "leaving in direction")):
            i = node_of[r]
            if i >= 0:
                if table[i, direction[r]] >= 0:
                    raise VimarlError(f"intersection {signal_ids[i]} has two roads {what} {direction[r]} "
                                      f"({roads[table[i, direction[r]]]['id']}, {roads[r]['id']}); the model "
                                      f"needs at most one road per approach")
                table[i, direction[r]] = r
    phases_from_file = np.zeros(n, dtype=bool)
    for node_id in signal_ids:
        it = inters[node_id]
        links = it["roadLinks"]
        for link in links:
            a, b = road_index[link["startRoad"]], road_index[link["endRoad"]]
            m = MOVEMENT_TYPES.get(link.get("type"))
            if m is None:
                raise VimarlError(f"road link {link['startRoad']} -> {link['endRoad']} has unknown type "
                                  f"{link.get('type')!r}")
            if down[a, m] >= 0 and down[a, m] != b:
                raise VimarlError(f"road {link['startRoad']} has two {link['type']} links ({roads[down[a, m]]['id']}, "
                                  f"{link['endRoad']}); the model needs one road per movement")
            down[a, m] = b
            movement_lanes[a, m] = max(1, len({k["startLaneIndex"] for k in link.get("laneLinks") or []}))
        phases = (it.get("trafficLight") or {}).get("lightphases", [])
        phases_from_file[node_index[node_id]] = len(phases) == 9
        for r in np.flatnonzero(end == node_index[node_id]):
            if len(phases) != 9:
                green[r] = STANDARD_PHASES[:, heading[r], :]
        if len(phases) == 9:
            for p, phase in enumerate(phases):
                for k in phase.get("availableRoadLinks", []):
                    link = links[k]
                    green[road_index[link["startRoad"]], p, MOVEMENT_TYPES[link["type"]]] = True
    green &= (down >= 0)[:, None, :]

    schedule, routes = None, None
    if flows is None:
        turn_probs = _default_turns(down, end, turn_ratios)
    else:
        schedule, counts, routes = _read_routes(flows, roadnet_path, horizon, down, end, road_index, roads)
        total = counts.sum(1, keepdims=True)
        turn_probs = np.where(total > 0, counts / np.maximum(total, 1e-12),
                              _default_turns(down, end, turn_ratios))
    xy = np.array([[inters[k]["point"]["x"], inters[k]["point"]["y"]] for k in signal_ids], dtype=float)
    return Network(signal_ids, xy, [road["id"] for road in roads], end, start, heading, ticks, capacity,
                   down, turn_probs, green, in_road, out_road, schedule, length=length, speed=speed,
                   n_lanes=n_lanes, movement_lanes=np.maximum(movement_lanes, 1), phases_from_file=phases_from_file,
                   routes=routes)


def _read_routes(flows, roadnet_path, horizon, down, end, road_index, roads):
    """The flows as (schedule [T, R], turn counts [R, 4], RouteTable)."""
    r_count = len(roads)
    schedule = np.zeros((horizon, r_count))
    counts = np.zeros((r_count, 4))
    distinct: dict[tuple[int, ...], int] = {}
    route_times: list[np.ndarray] = []
    for flow in flows:
        route = [road_index.get(name) for name in flow.get("route", [])]
        if not route or None in route:
            raise VimarlError(f"flow route {flow.get('route')} names a road missing from {roadnet_path}")
        route = tuple(fill_route(route, down, roads))
        times = flow_times(flow, horizon).astype(int)
        np.add.at(schedule, (times, route[0]), 1.0)
        weight = max(len(times), 1)
        for a, b in itertools.pairwise(route):
            counts[a, int(np.flatnonzero(down[a] == b)[0])] += weight
        counts[route[-1], END] += weight
        k = distinct.setdefault(route, len(distinct))
        if k == len(route_times):
            route_times.append(times)
        else:
            route_times[k] = np.concatenate([route_times[k], times])
    counts[end < 0] = (0, 0, 0, 1)  # every vehicle leaves at the end of a road into the boundary
    # Route-suffix classes, sorted by (road, move).
    suffixes: dict[tuple[int, ...], tuple[int, int]] = {}
    for route in distinct:
        for j in range(len(route)):
            suffix = route[j:]
            if suffix not in suffixes:
                move = END if len(suffix) == 1 else int(np.flatnonzero(down[suffix[0]] == suffix[1])[0])
                suffixes[suffix] = (suffix[0], move)
    order = sorted(suffixes, key=lambda s: (suffixes[s], s))
    index = {s: c for c, s in enumerate(order)}
    road = np.array([suffixes[s][0] for s in order], dtype=np.int64)
    move = np.array([suffixes[s][1] for s in order], dtype=np.int64)
    nxt = np.array([index[s[1:]] if len(s) > 1 else -1 for s in order], dtype=np.int64)
    start = np.array([index[route] for route in distinct], dtype=np.int64)
    route_schedule = np.zeros((horizon, len(distinct)))
    for k, times in enumerate(route_times):
        np.add.at(route_schedule, (times, k), 1.0)
    return schedule, counts, RouteTable(road, move, nxt, start, route_schedule)


def fill_route(route: list[int], down: np.ndarray, roads) -> list[int]:
    """The route with gaps between consecutive roads filled by a fewest-roads path, as
    CityFlow's router fills them (it uses shortest length; on grids these agree)."""
    full = [route[0]]
    for target in route[1:]:
        a = full[-1]
        if target in down[a]:
            full.append(target)
            continue
        previous = {a: None}
        queue = deque([a])
        while queue and target not in previous:
            r = queue.popleft()
            for b in down[r]:
                if b >= 0 and b not in previous:
                    previous[int(b)] = r
                    queue.append(int(b))
        if target not in previous:
            raise VimarlError(f"no path from road {roads[a]['id']} to {roads[target]['id']} in the roadnet")
        path = [target]
        while previous[path[-1]] != a:
            path.append(previous[path[-1]])
        full.extend(reversed(path))
    return full
