"""Independent SAC: VPP without propagation, the "independent policy" ablation of 000 App. G.1.

"We just replace the variational policy propagation network by an independent policy network
and remain other parts the same": the policy is q_i(a_i | o_i), computed from the agent's own
embedding mu_i^0 with no mean-field rounds, while the critics V_i(s_i^M), Q_i(s_i^M, a_i, a_Ni)
(with `rounds` of state propagation) and the losses of Eq. 8 are exactly VPP's. The attention
settings of the config are unused.
"""

from __future__ import annotations

from vimarl.algos.base import Capabilities, register
from vimarl.algos.vpp import VPP, VPPConfig, VPPPolicy
from vimarl.envs.base import GroupSpec


@register("isac", "Independent SAC (000 App. G.1 ablation): VPP's critics and losses, "
          "independent per-agent policies", Capabilities(discrete=True, continuous=True, needs_graph=True))
class ISAC(VPP):
    Config = VPPConfig

    def build_policy(self, spec: GroupSpec, config: VPPConfig) -> VPPPolicy:
        return VPPPolicy(spec, config, rounds=0)
