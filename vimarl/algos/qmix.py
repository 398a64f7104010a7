"""QMIX (Rashid et al. 2018) as in oxwhirl/pymarl@c971afd (ALGO_SPECS §5.5).

QMIX replaces VDN's sum by a mixing network that is monotonic in every agent's utility and
conditioned on the global state s through hypernetworks:

    Q_tot(s, a) = f_s(Q_1(o_1, a_1), ..., Q_N(o_N, a_N)),   dQ_tot / dQ_i >= 0   (QMIX Eq. 5)

so the decentralised greedy actions still maximise Q_tot. The mixer (`modules/mixers/qmix.py`),
with q = (Q_1, ..., Q_N) and embedding width E = 32:

    W_1 = |hyper_w1(s)| in R^{N x E},   b_1 = Linear(s) in R^E
    h   = ELU(q W_1 + b_1)
    W_f = |hyper_wf(s)| in R^{E x 1},   V(s) = Linear(ReLU(Linear(s)))
    Q_tot = h W_f + V(s)

The absolute values make every weight from q to Q_tot non-negative, which with the monotonic
ELU gives the constraint. hyper_w1 and hyper_wf are two-layer MLPs with 64 ReLU units
(hypernet_layers = 2, hypernet_embed = 64 in this commit's qmix.yaml) or single linear layers.
Training is VDN's (vdn.py) with the mixer in place of the sum, the target mixer for s':

    y = R + gamma (1 - d) Qbar_tot(s', Qbar_i(o'_i, argmax_a' Q_i(o'_i, a')) for all i)   (double-Q, pymarl)

The mixer input is N per-agent values and the state, so its cost is O(N E) per state: the only
dense per-agent tensor, and no N x N one. pymarl's RMSprop (lr 5e-4) is replaced by Adam with
the same learning rate; the other departures are VDN's (see vdn.py). Agents are feed-forward by
default; `recurrent=True` gives pymarl's GRU agents, trained on replayed windows of consecutive
steps as described in vdn.py, the mixer applied to every step of the window with that step's state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vimarl.algos.base import Capabilities, register
from vimarl.algos.q_learning import QLearner, frozen_copy
from vimarl.algos.vdn import VDN, VDNConfig, agent_network
from vimarl.envs.base import GroupSpec
from vimarl.nn.mlp import mlp


@dataclass
class QMIXConfig(VDNConfig):
    mixing_embed_dim: int = 32
    """Width E of the mixing network's hidden layer (pymarl mixing_embed_dim 32)."""
    hypernet_layers: int = 2
    """Layers of the hypernetworks producing W_1 and W_f: 2 (64 ReLU units, this pymarl commit) or 1 (linear)."""
    hypernet_embed: int = 64
    """Hidden units of two-layer hypernetworks (pymarl hypernet_embed 64)."""


class QMixer(nn.Module):
    """f_s(q): [B, N] per-agent values and [B, S] states -> [B] Q_tot, monotonic in every q_i."""

    def __init__(self, n_agents: int, state_dim: int, config: QMIXConfig):
        super().__init__()
        embed = config.mixing_embed_dim
        hidden = (config.hypernet_embed,) if config.hypernet_layers == 2 else ()
        self.n_agents, self.embed = n_agents, embed
        self.hyper_w1 = mlp(state_dim, hidden, n_agents * embed)
        self.hyper_b1 = nn.Linear(state_dim, embed)
        self.hyper_wf = mlp(state_dim, hidden, embed)
        self.value = mlp(state_dim, (embed,), 1)

    def forward(self, q: Tensor, state: Tensor) -> Tensor:
        w1 = self.hyper_w1(state).abs().view(-1, self.n_agents, self.embed)
        hidden = nn.functional.elu(torch.einsum("bn,bne->be", q, w1) + self.hyper_b1(state))
        wf = self.hyper_wf(state).abs()
        return (hidden * wf).sum(-1) + self.value(state).squeeze(-1)


@register("qmix", "QMIX (pymarl): shared per-agent Q networks mixed by a monotonic hypernetwork "
          "conditioned on the global state, double-Q targets, epsilon-greedy",
          Capabilities(discrete=True, continuous=False, needs_state=True))
class QMIX(VDN):
    Config = QMIXConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: QMIXConfig, device="cpu"):
        QLearner.__init__(self, groups, state_dim, config, device)
        self.mixer = QMixer(self.n_agents, state_dim, config)
        self.target_mixer = frozen_copy(self.mixer)
        self.build(agent_network(self.spec, config))  # the optimiser covers the agents' network and the mixer

    def target_modules(self) -> list[tuple[nn.Module, nn.Module]]:
        return [*super().target_modules(), (self.target_mixer, self.mixer)]

    def mix(self, q: Tensor, state: Tensor | None, target: bool = False) -> Tensor:
        """Q_tot = f_s(q) with the online or the target mixer."""
        return (self.target_mixer if target else self.mixer)(q, state)
