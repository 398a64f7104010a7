"""Reusable layers on `[B, N, ...]` tensors with an agent Graph."""

from vimarl.nn.graph_ops import NeighborAttention, gather_neighbors, neighbor_mean, neighbor_sum
from vimarl.nn.mlp import mlp

__all__ = ["NeighborAttention", "gather_neighbors", "mlp", "neighbor_mean", "neighbor_sum"]
