"""Independent SAC: VPP without propagation, the "independent policy" ablation of 000 App. G.1.

"We just replace the variational policy propagation network by an independent policy network
and remain other parts the same": the policy is q_i(a_i | o_i), computed from the agent's own
embedding mu_i^0 with no message passing, while the critics V_i(s_i^M), Q_i(s_i^M, a_i, a_Ni)
(with `rounds` of state propagation) and the losses of Eq. 8 are exactly VPP's. It is `vpp`
with `independent=True`; the attention and inference settings of the config are unused.
"""

from __future__ import annotations

from dataclasses import dataclass

from vimarl.algos.base import Capabilities, register
from vimarl.algos.vpp import VPP, VPPConfig


@dataclass
class ISACConfig(VPPConfig):
    independent: bool = True
    """No propagation in the policy: q_i(a_i | o_i) (000 App. G.1's independent policy)."""


@register("isac", "Independent SAC (000 App. G.1 ablation): VPP's critics and losses, "
          "independent per-agent policies", Capabilities(discrete=True, continuous=True,
                                                          needs_graph=True, heterogeneous=True))
class ISAC(VPP):
    Config = ISACConfig
