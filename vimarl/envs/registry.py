"""Environment registry: names -> classes (imported on first use) and `make_env`."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vimarl.envs.base import BatchedEnv
from vimarl.envs.traffic.cities import CITIES as _CITIES
from vimarl.envs.traffic.cities import PREFIX as _DATA_PREFIX
from vimarl.envs.traffic.cities import missing as _missing_file
from vimarl.errors import VimarlError, unknown
from vimarl.fields import config_for


@dataclass(frozen=True)
class EnvEntry:
    name: str
    target: str
    """'module:Class' of the BatchedEnv subclass; imported only when the env is used."""
    description: str
    requires: str = ""
    """The pip extra that provides the simulator, when the env needs one."""
    defaults: tuple[tuple[str, Any], ...] = ()
    """Config values this name presets (e.g. coop_nav_n30 sets n_agents=30); user values win."""

    def missing_data(self) -> str | None:
        """None when every data file this name presets (CityFlow `cityflow:` paths) is readable,
        else the one-line reason (tests skip with it)."""
        for _, value in self.defaults:
            if isinstance(value, str) and value.startswith(_DATA_PREFIX):
                reason = _missing_file(value)
                if reason:
                    return reason
        return None

    def load(self) -> type[BatchedEnv]:
        module_name, _, class_name = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            hint = f"pip install 'vimarl[{self.requires}]'" if self.requires else "reinstall vimarl"
            raise VimarlError(f"env '{self.name}' cannot be loaded ({error}); {hint}") from None
        return getattr(module, class_name)


ENVIRONMENTS: dict[str, EnvEntry] = {}


def register_env(name: str, target: str, description: str, requires: str = "", **defaults: Any) -> None:
    ENVIRONMENTS[name] = EnvEntry(name, target, description, requires, tuple(defaults.items()))


def get_env(name: str) -> EnvEntry:
    if name not in ENVIRONMENTS:
        raise unknown("env", name, ENVIRONMENTS)
    return ENVIRONMENTS[name]


def make_env(name: str, num_envs: int = 1, seed: int = 0, device: str | torch.device = "cpu",
             config: Any = None, **scenario_kwargs: Any) -> BatchedEnv:
    """B = `num_envs` copies of environment `name`; kwargs are fields of the env's Config."""
    entry = get_env(name)
    env_cls = entry.load()
    if config is None:
        scenario_kwargs = {**dict(entry.defaults), **scenario_kwargs}
    config = config_for(env_cls, config, scenario_kwargs, "env", name)
    if num_envs < 1:
        raise VimarlError(f"num_envs must be at least 1, got {num_envs}")
    env = env_cls(config, num_envs=num_envs, seed=seed, device=device)
    env.name = name
    return env


_PARTICLE = "vimarl.envs.particle.scenarios"

register_env("grid_coordination", "vimarl.envs.toy.grid_coordination:GridCoordination",
             "n x n grid game of VPP App. G.1: agents pick 0/1, team reward -sum over grid edges "
             "of (a_i - a_j)^2, one-step episodes")
register_env("two_agents_meet", "vimarl.envs.toy.two_agents_meet:TwoAgentsMeet",
             "VM3-AC App. A: two agents start at (-1, 1) and (1, 1) and must meet while drifting upward; "
             "reward -distance, displacement actions")

# Classic MPE tasks (MA-SAC), as in mpe2.
register_env("spread", f"{_PARTICLE}.spread:Spread",
             "cooperative navigation as mpe2 simple_spread_v3: N agents cover N landmarks, "
             "shared coverage reward plus own collisions")
register_env("spread_n2", f"{_PARTICLE}.spread:Spread", "spread with 2 agents (MAMT 'Spread')", n_agents=2)
register_env("tag", f"{_PARTICLE}.tag:Tag",
             "predator-prey as mpe2 simple_tag_v3: slower predators chase faster prey among obstacles")
register_env("speaker_listener", f"{_PARTICLE}.speaker_listener:SpeakerListener",
             "cooperative communication as mpe2 simple_speaker_listener_v4")
register_env("adversary", f"{_PARTICLE}.adversary:Adversary",
             "physical deception as mpe2 simple_adversary_v3")

# Large-scale PIC scenarios (VPP, IP).
register_env("coop_nav", f"{_PARTICLE}.coop_nav:CoopNav",
             "PIC large-scale cooperative navigation: N agents, N landmarks, 26-dim local observations")
for _n in (3, 6, 15, 30, 100, 200, 1225):
    register_env(f"coop_nav_n{_n}", f"{_PARTICLE}.coop_nav:CoopNav",
                 f"coop_nav with {_n} agents", n_agents=_n)
register_env("hetero_nav", f"{_PARTICLE}.hetero_nav:HeteroNav",
             "PIC heterogeneous navigation: half big slow, half small fast agents")
register_env("hetero_nav_n100", f"{_PARTICLE}.hetero_nav:HeteroNav", "hetero_nav with 100 agents", n_agents=100)
register_env("coop_push", f"{_PARTICLE}.coop_push:CoopPush",
             "PIC cooperative push: N agents push a large ball to a target")
register_env("coop_push_n100", f"{_PARTICLE}.coop_push:CoopPush", "coop_push with 100 agents", n_agents=100)
register_env("prey_predator", f"{_PARTICLE}.prey_predator:PreyPredator",
             "PIC prey and predator: N predators chase scripted (or learned) prey among large landmarks")
register_env("prey_predator_n100", f"{_PARTICLE}.prey_predator:PreyPredator",
             "prey_predator with 100 predators", n_predators=100)

# VM3-AC, MAAC and MAMT tasks.
register_env("pp_capture", f"{_PARTICLE}.pp_capture:PPCapture",
             "VM3-AC continuous predator-prey: capture needs C predators at once, prey respawn")
for _n, _c in ((2, 1), (3, 1), (4, 2)):
    register_env(f"pp_capture_n{_n}", f"{_PARTICLE}.pp_capture:PPCapture",
                 f"pp_capture ({_n}, 16, {_c})", n_predators=_n, n_prey=16, capture_threshold=_c)
register_env("treasure", f"{_PARTICLE}.treasure:Treasure", "MAAC cooperative treasure collection")
for _n in (4, 5):  # VM3-AC's tasks: 2 banks and N - 2 collectors, continuous actions
    register_env(f"treasure_n{_n}", f"{_PARTICLE}.treasure:Treasure", f"treasure with {_n} agents (VM3-AC)",
                 n_collectors=_n - 2, action_mode="continuous")
register_env("spread_vm3ac", f"{_PARTICLE}.spread_vm3ac:SpreadVM3AC",
             "VM3-AC cooperative navigation: spread N = 3, T = 50, collision -10, +1 while every landmark "
             "is occupied, 2-D force actions")
register_env("rover_tower", f"{_PARTICLE}.rover_tower:RoverTower",
             "MAAC rover-tower: towers see goals and send 5 discrete messages to blind rovers")
register_env("spread3", f"{_PARTICLE}.spread3:Spread3",
             "MAMT Spread-3 with coupling sep / mix / ful reward structures (App. F)")

# MAgent2 (000 App. E.3, DGN's jungle).
register_env("jungle", "vimarl.envs.external.jungle:Jungle",
             "DGN's jungle on MAgent2: 20 agents share 12 foods on a 30 x 30 map, +1 eating, +2 attacking "
             "an agent (-4 to the victim), 120 steps", requires="magent")
register_env("jungle_t25", "vimarl.envs.external.jungle:Jungle",
             "jungle with VPP's 25-step episodes (000 App. E.3)", requires="magent", episode_length=25)

# PettingZoo environments through the adapter (vimarl.envs.external.from_pettingzoo).
_ADAPTER = "vimarl.envs.external.from_pettingzoo:PettingZooEnv"
register_env("pettingzoo", _ADAPTER, "any PettingZoo ParallelEnv: env.env=module:function env.kwargs={...}",
             requires="pettingzoo")
_MULTIWALKER = "pettingzoo.sisl.multiwalker_v9:parallel_env"
register_env("multiwalker", _ADAPTER, "SISL multiwalker_v9 (PettingZoo defaults: 3 walkers, shared reward, "
             "500 steps)", requires="sisl", env=_MULTIWALKER)
for _n in (2, 3, 4):
    register_env(f"multiwalker_n{_n}", _ADAPTER, f"multiwalker_v9 with {_n} walkers", requires="sisl",
                 env=_MULTIWALKER, kwargs={"n_walkers": _n})
register_env("pursuit", _ADAPTER, "SISL pursuit_v5: 8 pursuers catch 30 evaders on a 16 x 16 grid (MAMT)",
             requires="sisl", env="pettingzoo.sisl.pursuit_v5:parallel_env",
             kwargs={"n_pursuers": 8, "n_evaders": 30})
for _name, _module in (("spread", "simple_spread_v3"), ("tag", "simple_tag_v3"),
                       ("speaker_listener", "simple_speaker_listener_v4"), ("adversary", "simple_adversary_v3"),
                       ("reference", "simple_reference_v3"), ("push", "simple_push_v3"),
                       ("crypto", "simple_crypto_v3"), ("world_comm", "simple_world_comm_v3")):
    register_env(f"mpe2_{_name}", _ADAPTER, f"the reference mpe2 {_module} through the PettingZoo adapter",
                 requires="mpe", env=f"mpe2.{_module}:parallel_env")

# Traffic-signal control (VPP 000 §5 / App. E.1, IP 001 App. A.1): a batched queue model of
# CityFlow's tasks (vimarl.envs.traffic, docs/traffic.md); 100 decisions of 10 s per episode.
_TRAFFIC = "vimarl.envs.traffic.env:TrafficSignalEnv"
register_env("traffic_grid", _TRAFFIC, "traffic-signal control on a rows x cols grid (env.rows, env.cols): each "
             "intersection picks one of 8 phases every 10 s, reward -queue, metric average travel time")
for _n in (1, 2, 3, 4, 7, 10, 15, 35):
    register_env(f"traffic_grid_{_n}x{_n}", _TRAFFIC, f"traffic_grid with {_n} x {_n} intersections", rows=_n, cols=_n)
_TRAFFIC_EXAMPLES = Path(__file__).parent / "traffic" / "examples"
# speed=0: each road's speed is its lanes' maxSpeed (capped by the flows' vehicles), not the grids' 11.111.
register_env("traffic_cityflow", _TRAFFIC, "traffic-signal control on a CityFlow map: env.roadnet=PATH "
             "env.flow=PATH (default: a bundled 2 x 2 example)", speed=0.0,
             roadnet=str(_TRAFFIC_EXAMPLES / "roadnet_2x2.json"), flow=str(_TRAFFIC_EXAMPLES / "flow_2x2.json"))

# The same task on SUMO through libsumo (vimarl.envs.external.sumo; docs/traffic.md).
_SUMO = "vimarl.envs.external.sumo:SumoTrafficEnv"
for _n in (1, 2, 3, 4, 10):
    register_env(f"sumo_grid_{_n}x{_n}", _SUMO, f"traffic_grid_{_n}x{_n}'s task on SUMO (libsumo)", requires="sumo",
                 rows=_n, cols=_n)
register_env("sumo_net", _SUMO, "traffic-signal control on a SUMO network: env.net=PATH.net.xml "
             "env.routes=PATH.rou.xml (default: the 4 x 4 grid with synthetic demand)", requires="sumo")

# The public real-city CityFlow maps (vimarl.envs.traffic.cities; not bundled: `cityflow:` paths are
# read from $VIMARL_CITYFLOW_DATA or ../shared/data/cityflow, and env.roadnet / env.flow override them).
for _city in _CITIES.values():
    _files = {"roadnet": f"cityflow:{_city.folder}/{_city.roadnet}", "flow": f"cityflow:{_city.folder}/{_city.flow}",
              "speed": 0.0}  # the roadnet's lane speeds
    register_env(f"traffic_{_city.name}", _TRAFFIC, f"traffic-signal control on the real CityFlow map of "
                 f"{_city.description} (N = {_city.intersections}; data: docs/traffic.md)", **_files)
    register_env(f"sumo_{_city.name}", _SUMO, f"traffic_{_city.name}'s map and recorded flows converted to SUMO "
                 f"(libsumo)", requires="sumo", **_files)
