"""Batched traffic-signal control: a vectorised store-and-forward queue model (docs/traffic.md).

Every intersection of every one of the B sub-environments is advanced together, one simulated
second (tick) at a time; one decision lasts `decision_seconds` ticks. State, all [B, ...]:

- `moving [B, D, R, 4]`: vehicles travelling on road r at free-flow speed that reach its stop
  line at tick (ring slot) t; the last axis is their choice at the end of the road (left,
  straight, right, end). A vehicle entering road r at tick t arrives at tick t + travel_ticks[r].
- `queue [B, R, 3]`: vehicles stopped at the stop line, one queue (lane) per movement.
- `occupancy [B, R]`: moving + queued vehicles on the road (<= capacity: spill-back).
- `buffer [B, R]`: generated vehicles waiting to enter a full entry road (CityFlow's buffer).

Tick t: (1) vehicles due at t join their movement's queue, or leave the network if their choice
is "end"; (2) each intersection shows its lightphase (0, the transition phase, while a yellow is
running); (3) each green lane earns saturation_flow vehicles of discharge credit per second and
discharges min(queue, floor(credit)) vehicles, limited by the free space of the downstream road
(granted in the priority straight, left, right); (4) new vehicles are generated and enter their
first road as space allows; every vehicle entering a road draws its choice at the road's end
from the road's turning probabilities; (5) every vehicle in the network (buffer included) adds
one second to the travel-time account. Counts are whole vehicles; randomness comes from
`vimarl.envs.rng` keyed on (seed, sub-environment, episode, tick).

With a CityFlow flow file and `route_model = "vehicle"` (the default) vehicles keep their routes:
they are counted per route-suffix class (`network.RouteTable`; `moving [B, D, C]`, `queue_c`,
`buffer_c`), a crossing vehicle takes its route's next class instead of drawing a turn, and the
vehicles that leave a lane or an entry buffer are drawn uniformly among those there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from vimarl.envs import rng
from vimarl.envs.base import BatchedEnv, Discrete, GroupSpec, GroupStep, TimeStep
from vimarl.envs.graph import Graph, complete_graph
from vimarl.envs.traffic.network import DELTA, N_PHASES, grid_network, load_cityflow

SPAWN_STREAM = 0x7370_6177
TURN_STREAM = 0x7475_726E
ROUTE_STREAM = 0x726F_7574
ELAPSED_SCALE = 60.0
"""Observations hold the seconds since the current phase was chosen divided by this..."""
ELAPSED_MAX = 300
"""...counted up to this many seconds."""
OBS_DIM = N_PHASES + 2 + 12 + 12 + 4
RENDER_SIZE = 640
"""render(): the longest side of the image in pixels (at most)."""
GRAPHS = ("road", "complete")
"""The agents' graph choices (TrafficConfig.graph, SumoConfig.graph)."""
MAX_DECISION_SECONDS = 3600
"""Upper bound of decision_seconds (one hour per decision)."""
MAX_ROAD_LENGTH = 10_000.0
"""Upper bound of road_length in metres (a road's vehicle slots grow with it)."""
MAX_SATURATION_FLOW = 10.0
"""Upper bound of saturation_flow in vehicles per second of green per lane (20x the usual 0.5)."""
PHASE_COLOURS = np.array([[40, 90, 220], [150, 60, 200], [0, 160, 170], [230, 100, 160],
                          [90, 60, 130], [20, 120, 90], [130, 130, 230], [180, 120, 60]], dtype=np.uint8)
"""render(): intersection colour of each action (phase); the transition phase is drawn black."""


@dataclass
class SignalGridConfig:
    """The task's fields that the batched model (`TrafficConfig`) and the SUMO backend
    (`vimarl.envs.external.sumo.SumoConfig`) share, so that `env.<field>=...` sets up the same
    task on both."""

    rows: int = 4
    """Grid rows of intersections (synthetic grid; ignored with a CityFlow roadnet or SUMO net)."""
    cols: int = 4
    """Grid columns of intersections (synthetic grid; ignored with a CityFlow roadnet or SUMO net)."""
    episode_length: int = 100
    """Decisions per episode (the papers use 100)."""
    decision_seconds: int = 10
    """Simulated seconds per decision (CoLight's MIN_ACTION_TIME = 10)."""
    yellow_seconds: int = 5
    """Seconds of the transition phase (lightphase 0) when an intersection changes phase; they
    count inside the decision's seconds (CoLight's YELLOW_TIME = 5)."""
    all_red: bool = False
    """The transition phase is all red, right turns included; CityFlow's phase 0 keeps right turns
    green (SUMO: yellow on the links green before it)."""
    road_length: float = 300.0
    """Grid road length in metres (the benchmark grids' 300 m)."""
    speed: float = 11.111
    """Free-flow speed in m/s of grid roads (benchmark 40 km/h); with a CityFlow roadnet, 0 keeps
    each road's lane maxSpeed (capped by the flows' vehicle maxSpeed; the default of
    traffic_cityflow and the city maps), > 0 overrides it. SUMO with a CityFlow map ignores it."""
    demand_vph: float = 400.0
    """Synthetic demand: vehicles per hour generated on each entry road (Bernoulli each second)."""
    demand_ew_scale: float = 1.0
    """Multiplier of the demand on entry roads heading east or west."""
    demand_ns_scale: float = 1.0
    """Multiplier of the demand on entry roads heading north or south."""
    turn_ratios: tuple[float, float, float] = (0.15, 0.7, 0.15)
    """Probabilities of left, straight, right at each signalised intersection (renormalised over
    the existing movements); a flow or route file's routes replace them."""
    reward_scale: float = 0.25
    """r_i = -reward_scale x mean over the decision's seconds of the vehicles queued (SUMO:
    halting) on i's incoming lanes (CoLight's -0.25 x waiting vehicles)."""
    obs_scale: float = 0.05
    """Vehicle counts in observations and state are multiplied by this."""
    graph: Literal["road", "complete"] = "road"
    """The agents' graph (000 App. G, Fig. 8 (a)-(b)): road, the adjacent signalised intersection
    in each direction E, N, W, S (K = 4, padded at the border); complete, every other
    intersection (K = N - 1, no padding). Observations, rewards and state do not depend on it."""

    def __post_init__(self):
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"rows and cols must be at least 1, got {self.rows} x {self.cols}")
        check_graph(self.graph)
        if self.episode_length < 1 or self.decision_seconds < 1:
            raise ValueError("episode_length and decision_seconds must be at least 1")
        if not 0 <= self.yellow_seconds:
            raise ValueError(f"yellow_seconds must be >= 0, got {self.yellow_seconds}")
        if self.road_length <= 0 or self.speed < 0:
            raise ValueError(f"road_length must be positive and speed >= 0, got {self.road_length}, {self.speed}")
        # The model keeps per-second and per-vehicle-slot tensors: bound what sizes them.
        if self.decision_seconds > MAX_DECISION_SECONDS:
            raise ValueError(f"decision_seconds={self.decision_seconds} is out of range: it must be in "
                             f"[1, {MAX_DECISION_SECONDS}]")
        if self.road_length > MAX_ROAD_LENGTH:
            raise ValueError(f"road_length={self.road_length} is out of range: it must be in (0, {MAX_ROAD_LENGTH}] m")
        if not 0 <= self.demand_vph <= 3600 or self.demand_ew_scale < 0 or self.demand_ns_scale < 0:
            raise ValueError("demand_vph must be in [0, 3600] and the demand scales >= 0")
        if self.demand_vph * max(self.demand_ew_scale, self.demand_ns_scale) > 3600:
            raise ValueError("synthetic demand is at most one vehicle per second per entry road")
        if len(self.turn_ratios) != 3 or min(self.turn_ratios) < 0 or sum(self.turn_ratios) <= 0:
            raise ValueError(f"turn_ratios must be 3 non-negative numbers, got {self.turn_ratios}")


@dataclass
class TrafficConfig(SignalGridConfig):
    roadnet: str = ""
    """Path of a CityFlow roadnet JSON (`cityflow:REL`: REL in the CityFlow data folder,
    vimarl.envs.traffic.cities); empty: the synthetic rows x cols grid."""
    flow: str = ""
    """Path of a CityFlow flow JSON (needs roadnet; `cityflow:REL` as roadnet); empty: synthetic
    demand on the entry roads."""
    route_model: Literal["vehicle", "turns"] = "vehicle"
    """With a flow file: vehicle, every vehicle follows its own route (a lane's queue is served in
    random order); turns, vehicles draw each turn from per-road turning probabilities aggregated
    from the routes. Synthetic demand always uses turn_ratios."""
    saturation_flow: float = 0.5
    """Vehicles per second of green that one movement lane discharges (1800 veh/h); a movement
    served by k lanes of a CityFlow road (its laneLinks' start lanes) discharges k times this."""
    lanes: int = 3
    """Lanes per grid road (left, straight, right); sets the road capacity."""
    jam_spacing: float = 7.5
    """Metres of lane per stopped vehicle (length 5 + minGap 2.5): capacity = lanes x length / this."""
    road_capacity: float = 0.0
    """> 0: every road holds this many vehicles instead (tests of spill-back)."""
    demand_profile: Literal["uniform", "peak"] = "uniform"
    """uniform: constant rate; peak: rate x (1 + (peak_factor - 1) exp(-((t/T - peak_center) /
    peak_width)^2 / 2)) over the episode's T seconds."""
    peak_factor: float = 2.0
    """Rate multiplier at the top of the peak."""
    peak_center: float = 0.5
    """Time of the peak as a fraction of the episode."""
    peak_width: float = 0.15
    """Standard deviation of the peak as a fraction of the episode."""

    def __post_init__(self):
        super().__post_init__()
        if self.flow and not self.roadnet:
            raise ValueError("flow needs a roadnet")
        if self.saturation_flow <= 0 or self.jam_spacing <= 0 or self.lanes < 1:
            raise ValueError("saturation_flow, jam_spacing and lanes must be positive")
        if self.saturation_flow > MAX_SATURATION_FLOW:
            raise ValueError(f"saturation_flow={self.saturation_flow} is out of range: it must be in "
                             f"(0, {MAX_SATURATION_FLOW}] vehicles per second of green")
        if not self.roadnet and self.speed == 0:
            raise ValueError(f"speed must be positive on a grid, got {self.speed}")
        if self.route_model not in ("vehicle", "turns"):
            raise ValueError(f"route_model must be vehicle or turns, got {self.route_model!r}")
        if self.demand_profile not in ("uniform", "peak"):
            raise ValueError(f"demand_profile must be uniform or peak, got {self.demand_profile!r}")
        if self.demand_profile == "peak" and self.demand_vph * max(
                self.demand_ew_scale, self.demand_ns_scale) * self.peak_factor > 3600:
            raise ValueError("synthetic demand is at most one vehicle per second per entry road")


def check_graph(graph: str) -> None:
    """Raise ValueError unless `graph` is one of GRAPHS."""
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")


def intersection_graph(graph: str, road_neighbors: np.ndarray, road_mask: np.ndarray, num_envs: int,
                       device: torch.device | str) -> Graph:
    """The agents' graph of kind `graph` (see TrafficConfig.graph) in all `num_envs` environments,
    from the road graph's `[N, 4]` neighbours and mask (`Network.neighbors`)."""
    check_graph(graph)
    if graph == "complete":
        return complete_graph(len(road_neighbors), num_envs, device=device)
    neighbors = torch.as_tensor(road_neighbors, dtype=torch.int64, device=device)
    mask = torch.as_tensor(road_mask, dtype=torch.bool, device=device)
    return Graph(neighbors.expand(num_envs, -1, -1).contiguous(), mask.expand(num_envs, -1, -1).contiguous())


class TrafficSignalEnv(BatchedEnv):
    """One group "agents": each signalised intersection chooses its next phase (Discrete(8))."""

    Config = TrafficConfig
    state_fields = ("moving", "queue", "credit", "occupancy", "approaching", "buffer", "phase",
                    "yellow_left", "elapsed", "tick", "generated", "exited", "vehicle_seconds")

    def __init__(self, config: TrafficConfig, num_envs: int, seed: int = 0, device="cpu"):
        super().__init__(config, num_envs, seed, device)
        c = config
        self.max_steps = c.episode_length
        horizon = c.episode_length * c.decision_seconds
        if c.roadnet:
            net = load_cityflow(c.roadnet, c.flow or None, horizon, c.jam_spacing, c.turn_ratios, c.speed)
        else:
            net = grid_network(c.rows, c.cols, c.road_length, c.speed, c.lanes, c.jam_spacing, c.turn_ratios)
        self.network = net
        dev = self.device
        n, r = net.n_nodes, net.n_roads
        self.n_nodes, self.n_roads = n, r

        def t(x, dtype=torch.float32):
            return torch.as_tensor(x, dtype=dtype, device=dev)

        long = torch.int64
        self.travel_ticks = t(net.travel_ticks, long)
        self.ring = int(net.travel_ticks.max()) + 1
        cap = net.capacity if c.road_capacity <= 0 else [c.road_capacity] * r
        self.capacity = t(cap).floor()
        self.road_end = t(net.road_end, long)
        self.road_end_c = self.road_end.clamp_min(0)
        self.phase_green = t(net.phase_green, torch.bool)  # [R, 9, 3]
        self.turn_cum = t(net.turn_probs).cumsum(-1)[:, :3].contiguous()  # [R, 3] thresholds
        self.routes = net.routes if c.route_model == "vehicle" else None
        self.in_road_c, self.in_mask = t(net.in_road, long).clamp_min(0), t(net.in_road >= 0)
        self.out_road_c, self.out_mask = t(net.out_road, long).clamp_min(0), t(net.out_road >= 0)
        # feeders[r'] = flat index (3 r + m) of the movement of each priority (straight, left,
        # right) that leads into road r'; 3 R (a zero pad) where none.
        feeders = torch.full((r, 3), 3 * r, dtype=long)
        for m, slot in ((1, 0), (0, 1), (2, 2)):
            src = torch.nonzero(torch.as_tensor(net.down[:, m] >= 0)).flatten()
            feeders[torch.as_tensor(net.down[src, m]), slot] = src * 3 + m
        self.feeders = feeders.to(dev)
        # Credit is capped at ceil(s): a lane discharges at most ceil(s) vehicles a second and
        # s on average over a green, and an empty green lane banks at most that much. A movement
        # with k lanes has s k and ceil(s k).
        lanes_m = np.ones((r, 3)) if net.movement_lanes is None else net.movement_lanes
        self.sat = t(c.saturation_flow * lanes_m)  # [R, 3]
        self.credit_cap = self.sat.ceil()
        self.max_discharge = int(self.credit_cap.max())
        self.max_entry = math.ceil(c.saturation_flow)  # vehicles a second from the entry buffer
        self.max_inflow = 3 * self.max_discharge + self.max_entry  # three movements plus the entry buffer
        # Synthetic demand: per-second probabilities on the entry roads.
        entry = net.entry_roads
        self.entry_roads = t(entry, long)
        ew = (net.heading[entry] % 2 == 0)
        scale = torch.where(t(ew, torch.bool), c.demand_ew_scale, c.demand_ns_scale)
        self.entry_rate = c.demand_vph / 3600.0 * scale
        self.schedule = None if net.schedule is None else t(net.schedule)
        self.horizon = horizon

        self.graph = intersection_graph(c.graph, *net.neighbors(), num_envs, dev)
        self.groups = {"agents": GroupSpec(n_agents=n, obs_dim=OBS_DIM, action_space=Discrete(N_PHASES),
                                           graph_k=self.graph.k, static_graph=True)}
        self.state_dim = 10 * n + 1
        self.ar_b = torch.arange(num_envs, device=dev)
        self.ar_r = torch.arange(r, device=dev)

        zeros = lambda *shape, dtype=torch.float32: torch.zeros(num_envs, *shape, dtype=dtype, device=dev)
        self.moving = zeros(self.ring, r, 4)
        self.queue = zeros(r, 3)
        self.credit = zeros(r, 3)
        self.occupancy = zeros(r)
        self.approaching = zeros(r, 4)
        self.buffer = zeros(r)
        self.phase = zeros(n, dtype=long)
        self.yellow_left = zeros(n, dtype=long)
        self.elapsed = zeros(n, dtype=long)
        self.tick = zeros(dtype=long)
        self.generated = zeros()
        self.exited = zeros()
        self.vehicle_seconds = zeros()
        # Diagnostics of the last tick (tests): green movements, vehicles discharged and exited.
        self.last_green = zeros(r, 3, dtype=torch.bool)
        self.last_discharge = zeros(r, 3)
        self.last_exit = zeros(r)  # vehicles that left the network at the end of each road
        self.last_metrics: dict[str, Tensor] = {}
        """metrics() after the last step, before any auto-reset (an episode's final values)."""
        self._render_layout: dict | None = None  # render()'s pixel coordinates, computed on first use
        if self.routes is not None:
            self._init_routes(self.routes)

    def _init_routes(self, routes) -> None:
        """The route-following model (route_model = vehicle): vehicles are counted per route-suffix
        class (`RouteTable`): `moving [B, D, C]`, `queue_c [B, C]` at the stop line, `buffer_c
        [B, C]` in the entry buffers; `queue`, `buffer` and `approaching` stay their sums."""
        dev = self.device
        b, r = self.num_envs, self.n_roads
        self.state_fields = type(self).state_fields + ("queue_c", "buffer_c")
        road, move = torch.as_tensor(routes.road, device=dev), torch.as_tensor(routes.move, device=dev)
        self.n_classes = c_count = len(road)
        self.class_road = road
        self.class_key = road * 4 + move  # sorted (RouteTable)
        self.class_next = torch.as_tensor(routes.next, device=dev).clamp_min(0)
        self.class_queues = (move < 3).float()  # end classes leave at the stop line
        self.class_ticks = self.travel_ticks[road]
        self.route_start = torch.as_tensor(routes.start, device=dev)
        self.route_schedule = torch.as_tensor(routes.schedule, dtype=torch.float32, device=dev)
        lanes = torch.arange(r, device=dev).repeat_interleave(3) * 4 + torch.arange(3, device=dev).repeat(r)
        self.lane_bounds = (torch.searchsorted(self.class_key, lanes),
                            torch.searchsorted(self.class_key, lanes, right=True))
        first = torch.arange(r, device=dev) * 4
        self.road_bounds = (torch.searchsorted(self.class_key, first),
                            torch.searchsorted(self.class_key, first + 3, right=True))
        self.ar_c = torch.arange(c_count, device=dev)
        self.moving = torch.zeros(b, self.ring, c_count, device=dev)
        self.queue_c = torch.zeros(b, c_count, device=dev)
        self.buffer_c = torch.zeros(b, c_count, device=dev)

    def _by_choice(self, per_class: Tensor) -> Tensor:
        """[B, C] class counts -> [B, R, 4] by (road, choice at its end)."""
        out = per_class.new_zeros(self.num_envs, 4 * self.n_roads)
        out.index_add_(1, self.class_key, per_class)
        return out.view(self.num_envs, self.n_roads, 4)

    @staticmethod
    def _pick(counts: Tensor, bounds: tuple[Tensor, Tensor], n_pick: Tensor, u: Tensor) -> Tensor:
        """Whole vehicles drawn without replacement from groups of classes: group g holds the
        classes bounds[0][g] .. bounds[1][g] - 1 of `counts [B, C]`; n_pick [B, G] (at most the
        group's vehicles, at most u's last size K) are drawn uniformly among its vehicles with the
        uniforms u [B, G, K]. Returns the drawn vehicles per class [B, C]."""
        picked = torch.zeros_like(counts)
        lo, hi = bounds
        last = counts.shape[1] - 1
        for k in range(u.shape[-1]):
            remaining = counts - picked
            cum = remaining.cumsum(-1)
            cum0 = torch.nn.functional.pad(cum, (1, 0))
            before, total = cum0[:, lo], cum0[:, hi] - cum0[:, lo]
            j = torch.minimum((u[..., k] * total).floor(), (total - 1).clamp_min(0))
            idx = torch.searchsorted(cum, (before + j).contiguous(), right=True).clamp(max=last)
            picked.scatter_add_(1, idx, (n_pick > k).float())
        return picked

    # -- episodes ---------------------------------------------------------------------------
    def _reset_envs(self, env_mask: Tensor) -> None:
        for name in self.state_fields:
            tensor = getattr(self, name)
            tensor[env_mask] = 0

    def _step(self, actions: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        action = actions["agents"].to(self.device, torch.int64)
        change = action != self.phase
        self.yellow_left = torch.where(change, self.config.yellow_seconds, self.yellow_left)
        self.elapsed = torch.where(change, 0, self.elapsed)
        self.phase = action.clone()
        queued = torch.zeros(self.num_envs, self.n_nodes, device=self.device)
        # The decision's random numbers in two draws (the counter-based hash costs more than a tick),
        # keyed on (seed, sub-environment, episode, decision).
        seconds = self.config.decision_seconds
        if self.routes is None:
            turn_u = rng.uniform(self.seed, self.env_ids, self.episode_index, self.episode_step, TURN_STREAM,
                                 shape=(seconds, self.n_roads, self.max_inflow))
        else:  # which vehicles of each lane / entry buffer go next (4 R groups)
            turn_u = rng.uniform(self.seed, self.env_ids, self.episode_index, self.episode_step, ROUTE_STREAM,
                                 shape=(seconds, 4 * self.n_roads, self.max_discharge))
        spawn_u = None
        if self.schedule is None:
            spawn_u = rng.uniform(self.seed, self.env_ids, self.episode_index, self.episode_step, SPAWN_STREAM,
                                  shape=(seconds, len(self.entry_roads)))
        for k in range(seconds):
            self._tick(turn_u[:, k], None if spawn_u is None else spawn_u[:, k])
            queued += self.node_queue()
        rewards = -self.config.reward_scale * queued / self.config.decision_seconds
        self.last_metrics = self.metrics()  # before any auto-reset
        return {"agents": rewards}, torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)

    def step(self, actions: dict[str, Tensor]) -> TimeStep:
        """The base step, with the episode's traffic metrics ([B], before any auto-reset) in info:
        average_travel_time, vehicles_generated, vehicles_exited, vehicles_in_network."""
        step = super().step(actions)
        step.info.update(self.last_metrics)
        return step

    # -- the traffic model -----------------------------------------------------------------------
    def _tick(self, turn_u: Tensor, spawn_u: Tensor | None) -> None:
        """One second; `turn_u` ([B, R, M] turn draws, or [B, 4 R, K] with routes: which vehicles
        leave each lane and entry buffer) and `spawn_u [B, E]` are its uniform draws."""
        c, b = self.config, self.num_envs
        ar_b, ar_r = self.ar_b, self.ar_r
        now = self.tick % self.ring  # [B]
        routed = self.routes is not None
        # (1) arrivals at the stop line
        arrived = self.moving[ar_b, now]  # [B, R, 4] ([B, C] by class when routed)
        self.moving[ar_b, now] = 0.0
        if routed:
            self.queue_c += arrived * self.class_queues
            arrived = self._by_choice(arrived)
        self.approaching -= arrived
        self.queue += arrived[..., :3]
        finished = arrived[..., 3]
        self.occupancy -= finished
        self.exited += finished.sum(-1)
        self.last_exit = finished
        # (2) signals
        lightphase = torch.where(self.yellow_left > 0, 0, self.phase + 1)  # [B, N]
        road_phase = lightphase.gather(1, self.road_end_c.expand(b, -1))  # [B, R]
        green = self.phase_green[ar_r, road_phase]  # [B, R, 3]
        if c.all_red:
            green = green & (road_phase > 0).unsqueeze(-1)
        self.yellow_left = (self.yellow_left - 1).clamp_min(0)
        self.elapsed += 1
        # (3) discharge, limited by credit and by the downstream road's free space
        self.credit = torch.where(green, torch.minimum(self.credit + self.sat, self.credit_cap), 0.0)
        want = torch.minimum(self.queue, self.credit.floor())
        want_flat = torch.cat([want.reshape(b, -1), want.new_zeros(b, 1)], 1)
        wanted = want_flat[:, self.feeders]  # [B, R', 3] by priority straight, left, right
        space = self.capacity - self.occupancy
        grants = []
        for k in range(3):
            grant = torch.minimum(wanted[..., k], space)
            space = space - grant
            grants.append(grant)
        grants = torch.stack(grants, -1)
        moved_flat = torch.zeros_like(want_flat)
        moved_flat[:, self.feeders.flatten()] = grants.reshape(b, -1)  # pads receive zeros only
        moved = moved_flat[:, :-1].view(b, -1, 3)
        self.queue -= moved
        self.credit -= moved
        self.occupancy -= moved.sum(-1)
        inflow = grants.sum(-1)  # [B, R]
        self.last_green, self.last_discharge = green, moved
        # (4) generation and entry
        new = self._generate(spawn_u)
        self.generated += new.sum(-1)
        self.buffer += new
        release = torch.minimum(self.buffer, space.clamp_max(self.max_entry))
        self.buffer -= release
        inflow = inflow + release
        if routed:
            # Which vehicles leave each lane and each entry buffer (uniformly among those there);
            # a vehicle that crosses takes the next class of its route.
            r3 = 3 * self.n_roads
            crossed = self._pick(self.queue_c, self.lane_bounds, moved.reshape(b, -1), turn_u[:, :r3])
            self.queue_c -= crossed
            entered = torch.zeros_like(crossed).index_add_(1, self.class_next, crossed)
            self.buffer_c += self._generate_classes()
            released = self._pick(self.buffer_c, self.road_bounds, release, turn_u[:, r3:])
            self.buffer_c -= released
            entered += released
            lanes = self._by_choice(entered)
            slot = (self.tick.unsqueeze(1) + self.class_ticks) % self.ring  # [B, C]
            self.moving[ar_b.unsqueeze(1), slot, self.ar_c] += entered
        else:
            choice = (turn_u.unsqueeze(-1) >= self.turn_cum.unsqueeze(1)).sum(-1)  # [B, R, M] in 0..3
            present = torch.arange(self.max_inflow, device=self.device) < inflow.unsqueeze(-1)
            lanes = torch.zeros(b, self.n_roads, 4, device=self.device)
            lanes.scatter_add_(2, choice, present.float())
            slot = (self.tick.unsqueeze(1) + self.travel_ticks) % self.ring  # [B, R]
            self.moving[ar_b.unsqueeze(1), slot, ar_r] += lanes
        self.approaching += lanes
        self.occupancy += inflow
        # (5) travel-time account
        self.vehicle_seconds += self.occupancy.sum(-1) + self.buffer.sum(-1)
        self.tick += 1

    def _generate_classes(self) -> Tensor:
        """[B, C] vehicles generated this second by route class (route_model = vehicle); the same
        vehicles as `_generate`'s per-road counts."""
        row = self.tick.clamp(max=self.horizon - 1)
        new = self.route_schedule[row] * (self.tick < self.horizon).unsqueeze(1)  # [B, K]
        out = torch.zeros(self.num_envs, self.n_classes, device=self.device)
        out[:, self.route_start] = new
        return out

    def _generate(self, u: Tensor | None) -> Tensor:
        """[B, R] vehicles generated this second."""
        b = self.num_envs
        if self.schedule is not None:
            row = self.tick.clamp(max=self.horizon - 1)
            return self.schedule[row] * (self.tick < self.horizon).unsqueeze(1)
        new = torch.zeros(b, self.n_roads, device=self.device)
        rate = self.entry_rate
        c = self.config
        if c.demand_profile == "peak":
            frac = self.tick.float() / self.horizon
            bump = torch.exp(-0.5 * ((frac - c.peak_center) / c.peak_width) ** 2)
            rate = rate * (1.0 + (c.peak_factor - 1.0) * bump).unsqueeze(1)
        new[:, self.entry_roads] = (u < rate).float()
        return new

    # -- measurements -------------------------------------------------------------------------
    def node_queue(self) -> Tensor:
        """[B, N] vehicles queued on each intersection's incoming lanes (its waiting vehicles)."""
        per_road = self.queue.sum(-1)[:, self.in_road_c]  # [B, N, 4]
        return (per_road * self.in_mask).sum(-1)

    def in_network(self) -> Tensor:
        """[B] vehicles generated and not yet exited (on roads or in entry buffers)."""
        return self.occupancy.sum(-1) + self.buffer.sum(-1)

    def average_travel_time(self) -> Tensor:
        """[B] CityFlow's average travel time of the current episode: finished vehicles' travel
        times and the time so far of those still in the network, averaged over all generated
        vehicles (= vehicle-seconds / vehicles generated; 0 before the first vehicle)."""
        return self.vehicle_seconds / self.generated.clamp_min(1.0)

    def metrics(self) -> dict[str, Tensor]:
        return {"average_travel_time": self.average_travel_time(), "vehicles_generated": self.generated.clone(),
                "vehicles_exited": self.exited.clone(), "vehicles_in_network": self.in_network()}

    # -- rendering ----------------------------------------------------------------------------
    def render(self) -> np.ndarray:
        """Sub-environment 0 as an RGB image [H, W, 3] uint8 (`vimarl eval --gif`). Each road is a
        line on the right-hand side of its direction of travel, coloured by its occupancy over its
        capacity (green empty, yellow half full, red full: moving + queued vehicles); each
        intersection is a square in its phase's colour (PHASE_COLOURS), black during the
        transition. Entry and exit roads are drawn as stubs towards their boundary nodes."""
        if self._render_layout is None:
            self._render_layout = self._layout()
        layout = self._render_layout
        image = np.full((layout["height"], layout["width"], 3), 255, dtype=np.uint8)
        fill = (self.occupancy[0] / self.capacity).clamp(0, 1).cpu().numpy()
        image[layout["road_y"], layout["road_x"]] = _occupancy_colour(fill)[layout["road_id"]]
        colour = PHASE_COLOURS[self.phase[0].cpu().numpy()]
        colour[self.yellow_left[0].cpu().numpy() > 0] = 0
        image[layout["node_y"], layout["node_x"]] = colour[layout["node_id"]]
        return image

    def _layout(self) -> dict[str, np.ndarray | int]:
        """Pixel coordinates of every road and intersection of the network (computed once)."""
        net = self.network
        xy = net.node_xy.astype(float)
        inner = (net.road_start >= 0) & (net.road_end >= 0)
        lengths = np.linalg.norm(xy[net.road_end[inner]] - xy[net.road_start[inner]], axis=1)
        spacing = float(np.median(lengths)) if inner.any() and np.median(lengths) > 0 else self.config.road_length
        direction = np.asarray(DELTA, dtype=float)[net.heading]  # travel direction where each road ends
        start_c, end_c = net.road_start.clip(0), net.road_end.clip(0)
        stub = 0.6 * spacing  # entry and exit roads: drawn this long towards their boundary node
        start = np.where((net.road_start >= 0)[:, None], xy[start_c], xy[end_c] - stub * direction)
        end = np.where((net.road_end >= 0)[:, None], xy[end_c], xy[start_c] + stub * direction)
        drawn = (net.road_start >= 0) | (net.road_end >= 0)
        points = np.concatenate([start[drawn], end[drawn], xy])
        low, extent = points.min(0), np.maximum(points.max(0) - points.min(0), 1e-9)
        margin = 8
        scale = min((RENDER_SIZE - 2 * margin) / extent.max(), 120 / spacing)  # pixels per metre
        width, height = (np.ceil(extent * scale).astype(int) + 2 * margin + 1).tolist()

        def pixel(p):  # metres -> (column, row), y up
            return np.stack([(p[..., 0] - low[0]) * scale + margin, (low[1] + extent[1] - p[..., 1]) * scale + margin], -1)

        spacing_px = spacing * scale
        half = max(1, round(0.16 * spacing_px))  # intersection squares of 2 half + 1 pixels
        lane = max(1, round(0.05 * spacing_px))  # road line thickness
        ab = pixel(np.stack([start, end], 1))  # [R, 2, 2]
        along = ab[:, 1] - ab[:, 0]
        unit = along / np.maximum(np.linalg.norm(along, axis=-1, keepdims=True), 1e-9)
        right = np.stack([-unit[:, 1], unit[:, 0]], -1)  # right of travel in image coordinates (y down)
        offset = right * (lane + 1)
        trim_a = np.where(net.road_start >= 0, half + 1, 0)[:, None] * unit
        trim_b = np.where(net.road_end >= 0, half + 1, 0)[:, None] * unit
        a, b = ab[:, 0] + offset + trim_a, ab[:, 1] + offset - trim_b
        samples = int(np.ceil(np.linalg.norm(b - a, axis=-1).max())) + 1
        t = np.linspace(0.0, 1.0, max(samples, 2))
        line = a[:, None] + t[None, :, None] * (b - a)[:, None]  # [R, S, 2]
        road_id = np.broadcast_to(np.arange(len(a))[:, None], line.shape[:2])
        keep = drawn[road_id]
        line, road_id = line[keep], road_id[keep]
        k = np.arange(lane) - (lane - 1) // 2
        dx, dy = (g.ravel() for g in np.meshgrid(k, k))
        road_x = np.rint(line[:, None, 0] + dx).astype(int).ravel()
        road_y = np.rint(line[:, None, 1] + dy).astype(int).ravel()
        road_id = np.repeat(road_id, len(dx))
        k = np.arange(-half, half + 1)
        dx, dy = (g.ravel() for g in np.meshgrid(k, k))
        centre = np.rint(pixel(xy)).astype(int)
        node_x, node_y = (centre[:, None, 0] + dx).ravel(), (centre[:, None, 1] + dy).ravel()
        node_id = np.repeat(np.arange(len(xy)), len(dx))
        inside = (road_x >= 0) & (road_x < width) & (road_y >= 0) & (road_y < height)
        node_inside = (node_x >= 0) & (node_x < width) & (node_y >= 0) & (node_y < height)
        return {"width": width, "height": height, "road_x": road_x[inside], "road_y": road_y[inside],
                "road_id": road_id[inside], "node_x": node_x[node_inside], "node_y": node_y[node_inside],
                "node_id": node_id[node_inside]}

    # -- observations -------------------------------------------------------------------------
    def _observe(self) -> tuple[dict[str, GroupStep], Tensor | None]:
        c, b = self.config, self.num_envs
        mask = self.in_mask.unsqueeze(-1)
        queue = self.queue[:, self.in_road_c] * mask  # [B, N, 4, 3]
        approaching = self.approaching[:, self.in_road_c, :3] * mask
        out = self.occupancy[:, self.out_road_c] * self.out_mask  # [B, N, 4]
        phase = torch.nn.functional.one_hot(self.phase, N_PHASES).float()
        yellow = (self.yellow_left > 0).float().unsqueeze(-1)
        elapsed = (self.elapsed.clamp(max=ELAPSED_MAX).float() / ELAPSED_SCALE).unsqueeze(-1)
        s = c.obs_scale
        obs = torch.cat([phase, yellow, elapsed, queue.flatten(2) * s, approaching.flatten(2) * s, out * s], -1)
        per_node = torch.cat([queue.sum(-1) * s, approaching.sum(-1) * s,
                              self.phase.float().unsqueeze(-1) / (N_PHASES - 1), yellow], -1)
        progress = (self.episode_step.float() / self.max_steps).unsqueeze(-1)
        state = torch.cat([per_node.flatten(1), progress], -1)
        zeros = torch.zeros(b, self.n_nodes, device=self.device)
        return {"agents": GroupStep(obs=obs, reward=zeros, graph=self.graph)}, state


def _occupancy_colour(fill: np.ndarray) -> np.ndarray:
    """[R, 3] uint8: green (0) -> yellow (0.5) -> red (1)."""
    stops = np.array([[40, 170, 60], [240, 200, 40], [220, 30, 30]], dtype=float)
    low = np.minimum((fill * 2).astype(int), 1)
    w = (fill * 2 - low)[:, None]
    return np.rint(stops[low] * (1 - w) + stops[low + 1] * w).astype(np.uint8)
