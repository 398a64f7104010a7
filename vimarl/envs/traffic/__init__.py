"""Traffic-signal control: a batched queue model of signalised road networks (docs/traffic.md)."""

from vimarl.envs.traffic.controllers import FixedTimePolicy, MaxPressurePolicy
from vimarl.envs.traffic.env import TrafficConfig, TrafficSignalEnv
from vimarl.envs.traffic.network import Network, grid_network, load_cityflow

__all__ = ["FixedTimePolicy", "MaxPressurePolicy", "Network", "TrafficConfig", "TrafficSignalEnv",
           "grid_network", "load_cityflow"]
