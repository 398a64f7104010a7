"""Environments: the batched contract, agent graphs, and the registry."""

from vimarl.envs.base import BatchedEnv, Box, Discrete, GroupSpec, GroupStep, TimeStep
from vimarl.envs.graph import Graph
from vimarl.envs.registry import ENVIRONMENTS, make_env, register_env

__all__ = ["BatchedEnv", "Box", "Discrete", "ENVIRONMENTS", "Graph", "GroupSpec", "GroupStep",
           "TimeStep", "make_env", "register_env"]
