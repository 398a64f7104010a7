"""Pieces of centralised-critic methods (MA-SAC, MADDPG, PIC-style baselines).

- `BatchedLinear` / `AgentMLP`: one network per agent evaluated for all agents at once
  (weights [N, in, out], one einsum per layer instead of a Python loop over agents), or one
  network shared by the agents with a one-hot agent id appended to its input.
- `joint_input`: the centralised critic input x = (o_1, ..., o_N, a_1, ..., a_N) for every agent's
  critic, [B, N, N (obs + act)], optionally with the gradient of the actions restricted to each
  critic's own agent. Its size is O(N^2) per batch row: fine for the small N of MPE-style tasks
  (N <= ~30), not for hundreds of agents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vimarl.nn.mlp import mlp


class BatchedLinear(nn.Module):
    """N independent linear maps applied to [..., N, in] -> [..., N, out] (weight [N, in, out])."""

    def __init__(self, n: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(n, out_dim))
        bound = 1.0 / math.sqrt(in_dim) if in_dim else 0.0  # nn.Linear's default initialisation
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("...ni,nio->...no", x, self.weight) + self.bias


class AgentMLP(nn.Module):
    """An MLP per agent on [..., N, in] -> [..., N, out].

    shared=True: one MLP for all agents, reading [x_i, onehot(i)] so agents can still differ;
    shared=False: N MLPs with their own weights, batched (`BatchedLinear`).
    """

    def __init__(self, n_agents: int, in_dim: int, hidden: Sequence[int], out_dim: int, shared: bool,
                 activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.n_agents, self.shared = n_agents, shared
        if shared:
            self.net = mlp(in_dim + n_agents, hidden, out_dim, activation)
            self.register_buffer("agent_ids", torch.eye(n_agents), persistent=False)
        else:
            sizes = [in_dim, *hidden, out_dim]
            layers: list[nn.Module] = []
            for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
                layers.append(BatchedLinear(n_agents, a, b))
                if i < len(sizes) - 2:
                    layers.append(activation())
            self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.shared:
            ids = self.agent_ids.expand(*x.shape[:-1], self.n_agents)
            x = torch.cat([x, ids], dim=-1)
        return self.net(x)


def joint_input(obs: Tensor, actions: Tensor, own_action_gradient_only: bool = False) -> Tensor:
    """x = (o_1..o_N, a_1..a_N) for each agent's critic: obs [B, N, O], actions [B, N, A] -> [B, N, N (O + A)].

    With `own_action_gradient_only`, row i carries the gradient of a_i alone (the other agents'
    actions are detached there), so sum_i Q_i(x, a) sends agent j's policy gradient only through
    Q_j; values are unchanged.
    """
    b, n = obs.shape[:2]
    x = obs.reshape(b, 1, -1).expand(b, n, -1)
    if own_action_gradient_only and actions.requires_grad:
        fixed = actions.detach()
        eye = torch.eye(n, dtype=actions.dtype, device=actions.device).view(1, n, n, 1)
        joint = fixed.unsqueeze(1) + eye * (actions - fixed).unsqueeze(1)  # [B, N(critic), N, A]
        joint = joint.reshape(b, n, -1)
    else:
        joint = actions.reshape(b, 1, -1).expand(b, n, -1)
    return torch.cat([x, joint], dim=-1)


class CentralTwinQ(nn.Module):
    """Per-agent centralised twin critics Q_i^1, Q_i^2 (x, a_1..a_N) and their target copies."""

    def __init__(self, n_agents: int, obs_dim: int, act_dim: int, hidden: Sequence[int], shared: bool):
        super().__init__()
        in_dim = n_agents * (obs_dim + act_dim)
        self.q = nn.ModuleList(AgentMLP(n_agents, in_dim, hidden, 1, shared) for _ in range(2))
        self.target_q = nn.ModuleList(AgentMLP(n_agents, in_dim, hidden, 1, shared) for _ in range(2))
        self.target_q.load_state_dict(self.q.state_dict())
        self.target_q.requires_grad_(False)

    def values(self, inputs: Tensor, target: bool = False) -> list[Tensor]:
        """Both critics' values [B, N] on `joint_input` rows."""
        return [q(inputs).squeeze(-1) for q in (self.target_q if target else self.q)]

    def min_value(self, inputs: Tensor, target: bool = False) -> Tensor:
        """min_j Q_i^j(x, a): [B, N]."""
        return torch.minimum(*self.values(inputs, target))
