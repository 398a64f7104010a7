"""Intention Propagation (paper 001): VPP (000) as written up with twin critics.

The same method as `vpp` (see vimarl/algos/vpp.py for the equations): a mean-field (or
loopy-BP) policy over the agent graph trained with Eq. 8's losses, with the 001 write-up's
differences as defaults: twin Q_i networks whose minimum enters the V target and J_pi
(Sec. 4.3), 128 hidden units in every layer, and the final node feature concatenating the
features of all h layers (App. B.2). Table 2's lr 0.01, gamma 0.95, tau 0.01, alpha 0.2 are
VPP's too; its batch 1024, buffer 1e6 and 8 gradient steps are training settings (the
`ip-paper` preset).
"""

from __future__ import annotations

from dataclasses import dataclass

from vimarl.algos.base import Capabilities, register
from vimarl.algos.vpp import VPP, VPPConfig


@dataclass
class IPConfig(VPPConfig):
    embed_dim: int = 128
    """Width of the policy embeddings (001 App. B.2: 128 hidden units per layer)."""
    state_dim: int = 128
    """Width of the propagated states (001 App. B.2: 128 hidden units per layer)."""
    concat_hops: bool = True
    """The final node feature concatenates the features of every layer (001 App. B.2)."""
    twin_critics: bool = True
    """Twin Q_i with the minimum in the V target and J_pi (001 Sec. 4.3)."""


@register("ip", "Intention Propagation (001): VPP with twin critics and concatenated layer features",
          Capabilities(discrete=True, continuous=True, needs_graph=True, heterogeneous=True))
class IP(VPP):
    Config = IPConfig
