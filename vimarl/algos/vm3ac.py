"""VM3-AC: variational maximum mutual information multi-agent actor-critic (paper 002).

A latent z_t ~ N(0, I), drawn once per step and fed to every agent's policy pi^i(a^i | o^i, z_t),
makes simultaneous actions correlated (Sec. 4, Fig. 1c). The return is regularised by the mutual
information between the agents' actions, replaced by the variational lower bound (Eq. 10-11)

    beta H(a^i | s) + (beta / N) sum_{j != i} [ log q(a^i | a^j, s) + log q(a^j | a^i, s) ],

with q_xi^i(a^j | a^i, o^i, o^j) = N(mu_xi^i(a^i, o^i, o^j), sigma^2 I) (Sec. 5, fixed sigma), one
network per agent i shared over j, which reads a one-hot of j (App. F). Centralised training
(App. C) on x = (o^1, ..., o^N) and the joint action a, with a' and z resampled at update time:

    V_hat^i(x)  = E_{z, a ~ pi(.|o, z)}[ min_k Q^{i,k}(x, a) - beta log pi^i(a^i | o^i, z)
                                         + (beta/N) sum_{j != i} log q^(i,j)(a^i, a^j | o^i, o^j) ]  (Eq. 46)
    L_V(psi^i)  = E_D[ 1/2 (V^i(x) - V_hat^i(x))^2 ]                                            (Eq. 45)
    Q_hat^i     = r^i + gamma (1 - d) Vbar^i(x')                                                 (Eq. 48)
    L_Q(theta^i)= E_D[ 1/2 (Q^{i,k}(x, a) - Q_hat^i)^2 ]  for both twins k                       (Eq. 47)
    L_pi,q      = E[ -Q^{i,1}(x, a) + beta log pi^i(a^i | o^i, z) - (beta/N) sum_{j != i} log q^(i,j) ]  (Eq. 49)
    log q^(i,j) = log q_xi^i(a^i | a^j, o^i, o^j) + log q_xi^i(a^j | a^i, o^i, o^j)
                  `------------- (a) ------------'   `------------- (b) ------------'          (Eq. 50)

with reparameterised actions a^i = f(o^i; eps^i, z), Vbar the Polyak-averaged target V, and the
gradient of Eq. 49 taken through term (b) only ("to make learning stable", App. C). Execution
(Sec. 5, Algorithm 1, App. H) plays the policy mean given z = E[z] = 0 (`z_mode="mean"`) or z
from a Gaussian generator that every agent holds with the same seed (`z_mode="shared_seed"`).

MA-AC (`ma_ac`, Sec. 6 baseline) is VM3-AC with beta = 0 and no latent variable.

Choices the paper leaves open, documented here:
- Eq. 50 writes both terms with agent i's network q_xi^i; with App. F's network (the conditioning
  action, o^i, o^j, onehot(j)) -> mean of the other action, term (a) feeds it a^j and scores a^i.
  Term (a) carries no gradient anyway, so it only enters the value target Eq. 46.
- Eq. 49 is L(phi^i, xi): in agent i's loss the other agents' actions a^j are constants (as in
  the policy improvement step of Sec. 4, "keeping other agents' policies fixed"), so term (b)
  trains xi^i and, through the conditioning action a^i, phi^i.
- One z and one reparameterised joint action per transition and gradient step serve both Eq. 46
  and Eq. 49 (Algorithm 1 draws "z_l for each transition" once per step, as Spinning Up v1 shares
  its sample between the V target and the policy loss).
- sigma is not given in the paper (`q_sigma`). The critics are CentralQ's plain MLPs over x and a,
  not the "own observation and action emphasised" architecture of Kim et al. cited in App. F.
- q over agents of several groups needs one action size; observations are zero-padded to the
  largest group's size in q's input. Sums over agents are means (Adam absorbs N).
- Discrete actions are not in App. C (its SMAC variant builds on FOP instead): as in masac they
  are straight-through Gumbel-softmax one-hots with log pi the exact E[log pi], and q is the same
  Gaussian over the one-hot vector. Box actions are tanh Gaussians (Table 1's tanh output layer).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vimarl.algos.base import Algorithm, Capabilities, adam, agent_mean, frozen, polyak, register
from vimarl.algos.masac import AgentPolicies
from vimarl.buffer import Transition
from vimarl.envs.base import GroupSpec
from vimarl.errors import VimarlError
from vimarl.nn.centralized import AgentMLP, CentralQ, flatten_agents, joint_input, td_target
from vimarl.nn.distributions import PolicySample, action_dim, action_features


@dataclass
class VM3ACConfig:
    lr: float = 3e-4
    """Adam learning rate of every network (002 Table 1)."""
    gamma: float = 0.99
    """Discount of the Q target, Eq. 48 (002 Table 1)."""
    tau: float = 0.005
    """Polyak step of the target value network Vbar after every gradient step (002 Table 1)."""
    hidden_dim: int = 128
    """Units of each of the two ReLU hidden layers of every network (002 Table 1)."""
    beta: float = 0.1
    """Temperature beta = alpha N weighing the entropy and MI bound against the reward (Eq. 11). Per
    task (002 Table 2): multi-walker N=3 0.05, N=4 0.1; predator-prey N=2 0.15, N=3 0.1, N=4 0.2;
    treasure collection N=4, 5 0.05; cooperative navigation N=3 0.1. 0 switches q off (MA-AC)."""
    latent_dim: int = 8
    """Dimension of the shared latent z ~ N(0, I) (002 Table 2: 8, or 10 for treasure collection);
    0 removes the latent (the "VM3-AC without latent variable" ablation, Sec. 6)."""
    q_sigma: float = 1.0
    """Fixed standard deviation sigma of q_xi^i(a^j | a^i, o^i, o^j) = N(mu, sigma^2 I) (Sec. 5;
    the paper gives no value)."""
    z_mode: Literal["mean", "shared_seed"] = "mean"
    """z at evaluation (explore=False): "mean" plays z = E[z] = 0 (App. H), "shared_seed" the next
    draw of a Gaussian generator every agent holds with seed `z_seed` (Sec. 5, execution with
    timing information; restart it with `reset_latent`)."""
    z_seed: int = 0
    """Seed distributed to every agent's latent generator before execution (`z_mode="shared_seed"`)."""
    parameter_sharing: bool = False
    """One policy per group and one V, twin Q and q network shared by the agents, each reading a
    one-hot agent id (not in 002, whose agents have their own networks), or one network per agent."""


class VariationalQ(nn.Module):
    """q_xi^i(value | given, o^i, o^j) = N(mu_xi^i(given, o^i, o^j, onehot(j)), sigma^2 I) of every
    agent i, one network per i shared over j (Sec. 5, App. F)."""

    def __init__(self, n: int, obs_dim: int, action_size: int, hidden: int, shared: bool, sigma: float):
        super().__init__()
        self.sigma = sigma
        self.mu = AgentMLP(n, action_size + 2 * obs_dim + n, (hidden, hidden), action_size, shared)
        self.register_buffer("j_ids", torch.eye(n), persistent=False)

    def log_prob(self, value: Tensor, given: Tensor, obs: Tensor) -> Tensor:
        """log q_xi^i(value[:, i, j] | given[:, i, j], o^i, o^j): value, given [B, N, N, A], obs [B, N, O] -> [B, N, N]."""
        b, n = obs.shape[:2]
        o_i = obs.unsqueeze(2).expand(b, n, n, -1)
        o_j = obs.unsqueeze(1).expand(b, n, n, -1)
        inputs = torch.cat([given, o_i, o_j, self.j_ids.expand(b, n, n, n)], dim=-1)
        # AgentMLP keeps one network per entry of the second-last axis: put agent i there.
        mu = self.mu(inputs.transpose(1, 2)).transpose(1, 2)
        return torch.distributions.Normal(mu, self.sigma).log_prob(value).sum(-1)


@register("vm3ac", "VM3-AC (002): latent z shared by all policies, variational MI lower bound instead of "
          "entropy, centralised twin Q, V and target V; execution with z = 0 or a shared seed",
          Capabilities(discrete=True, continuous=True, heterogeneous=True))
class VM3AC(Algorithm):
    Config = VM3ACConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: VM3ACConfig, device="cpu"):
        super().__init__(groups, state_dim, config, device)
        shared, hidden = config.parameter_sharing, config.hidden_dim
        self.n_agents = sum(spec.n_agents for spec in groups.values())
        self.obs_pad = max(spec.obs_dim for spec in groups.values())
        # pi^i(a^i | o^i, z): masac's per-agent policies (tanh Gaussian for Box actions) reading [o^i, z].
        self.policy = nn.ModuleDict({g: AgentPolicies(replace(spec, obs_dim=spec.obs_dim + config.latent_dim),
                                                      hidden, shared) for g, spec in groups.items()})
        self.critics = CentralQ(groups, (hidden, hidden), shared, twins=2)  # Q^{i,1}, Q^{i,2}; targets unused
        x_dim = sum(spec.n_agents * spec.obs_dim for spec in groups.values())
        self.v = AgentMLP(self.n_agents, x_dim, (hidden, hidden), 1, shared)
        self.target_v = AgentMLP(self.n_agents, x_dim, (hidden, hidden), 1, shared)
        self.target_v.load_state_dict(self.v.state_dict())
        self.target_v.requires_grad_(False)
        action_size = action_dim(next(iter(groups.values())).action_space)
        # With beta = 0 (MA-AC) the MI bound has no weight, so no q is built.
        self.variational = (VariationalQ(self.n_agents, self.obs_pad, action_size, hidden, shared, config.q_sigma)
                            if config.beta else None)
        self.to(self.device)
        self.z_mode = config.z_mode
        self.reset_latent()
        actor = [*self.policy.parameters(), *(self.variational.parameters() if self.variational else [])]
        self.optimizers = {"actor": adam(actor, lr=config.lr),  # phi and xi, Eq. 49
                           "critic": adam([*self.critics.q.parameters(), *self.v.parameters()], lr=config.lr)}

    @classmethod
    def check_env(cls, env_name: str, groups: dict[str, GroupSpec], state_dim: int) -> None:
        super().check_env(env_name, groups, state_dim)
        sizes = {action_dim(spec.action_space) for spec in groups.values()}
        if len(sizes) > 1:
            raise VimarlError(f"algorithm '{cls.name}' needs one action size across groups for q(a^j | a^i) "
                              f"but env '{env_name}' has {sorted(sizes)}")

    # --- the shared latent z ---------------------------------------------------------------

    def reset_latent(self) -> None:
        """(Re)start the execution generator at seed `z_seed`: the seed and initiation timing that
        002 Sec. 5 distributes to every agent before deployment."""
        self.z_generator = torch.Generator(device=self.device).manual_seed(self.config.z_seed)

    def evaluation_modes(self) -> dict[str, str]:
        # App. H compares both executions; without a latent they coincide.
        return {"z_mean": "mean", "z_shared_seed": "shared_seed"} if self.config.latent_dim else {}

    @contextmanager
    def execution(self, mode: str | None = None) -> Iterator[None]:
        """Deploy with `z_mode` = mode (None: the configured one), the shared generator restarted."""
        configured = self.z_mode
        self.z_mode = mode or configured
        self.reset_latent()
        try:
            yield
        finally:
            self.z_mode = configured

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "z_generator": self.z_generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.z_generator.set_state(state.pop("z_generator"))
        super().set_extra_state(state)

    def latent(self, n_envs: int, explore: bool) -> Tensor:
        """z_t for one step of `n_envs` sub-environments, [n_envs, latent_dim]; row b is shared by every
        agent of sub-environment b. Training (explore) samples z ~ N(0, I) freely (centralised, so
        sharing is free); evaluation follows `z_mode`: 0, or the next draw of the shared-seed generator."""
        shape = (n_envs, self.config.latent_dim)
        if explore:
            return torch.randn(shape, device=self.device)
        if self.z_mode == "mean":
            return torch.zeros(shape, device=self.device)
        return torch.randn(shape, generator=self.z_generator, device=self.device)

    @staticmethod
    def with_latent(obs: Tensor, z: Tensor) -> Tensor:
        """[o^i, z] for every agent: obs [B, N, O], z [B, d] -> [B, N, O + d], the same z for all agents."""
        return torch.cat([obs, z.unsqueeze(1).expand(-1, obs.shape[1], -1)], dim=-1)

    # --- acting ------------------------------------------------------------------------------

    @torch.no_grad()
    def act(self, obs, graph, *, explore, action_mask=None, state=None):
        z = self.latent(next(iter(obs.values())).shape[0], explore)
        actions = {}
        for g in self.groups:
            distribution = self.policy[g](self.with_latent(obs[g], z), (action_mask or {}).get(g))
            # Evaluation plays the policy's mean action given z (App. H, "deterministic evaluation").
            actions[g] = distribution.sample().action if explore else distribution.mode()
        return actions

    def samples(self, obs: dict[str, Tensor], z: Tensor, masks: dict[str, Tensor | None]) -> list[PolicySample]:
        """Reparameterised a^i = f(o^i; eps^i, z) of every group's agents, groups in order."""
        return [self.policy[g](self.with_latent(obs[g], z), masks[g]).sample() for g in self.groups]

    # --- the variational MI lower bound ------------------------------------------------------

    def padded_obs(self, obs: dict[str, Tensor]) -> Tensor:
        """Every controlled agent's o^i zero-padded to one size for q's input: [B, N, O_max]."""
        return torch.cat([F.pad(obs[g], (0, self.obs_pad - obs[g].shape[-1])) for g in self.groups], dim=1)

    def mi_bound(self, obs: dict[str, Tensor], actions: Tensor, present: Tensor | None = None) -> Tensor:
        """(beta/N) sum_{j != i} log q^(i,j)(a^i, a^j | o^i, o^j) (Eq. 46, 49-50) per agent i: [B, N],
        the sum over the agents j `present` ([B, N] bool, None: all) when agents can leave.

        Term (a) is detached and so is a^j in term (b): the gradient reaches xi^i and a^i through
        term (b) only (App. C, after Eq. 50)."""
        if self.variational is None:
            return actions.new_zeros(actions.shape[:2])
        n = self.n_agents
        own = actions.unsqueeze(2).expand(-1, n, n, -1)                   # a^i at [:, i, j]
        other = actions.detach().unsqueeze(1).expand(-1, n, n, -1)       # a^j at [:, i, j]
        x = self.padded_obs(obs)
        term_a = self.variational.log_prob(own, other, x).detach()        # log q_xi^i(a^i | a^j, o^i, o^j)
        term_b = self.variational.log_prob(other, own, x)                 # log q_xi^i(a^j | a^i, o^i, o^j)
        others = ~torch.eye(n, dtype=torch.bool, device=actions.device)
        if present is not None:
            others = others & present.unsqueeze(1)  # a departed agent j pairs with nobody
        pairs = ((term_a + term_b) * others).sum(-1)
        return self.config.beta / n * pairs

    # --- losses (App. C) ---------------------------------------------------------------------

    def update(self, batch: Transition) -> dict[str, Tensor]:
        # Algorithm 1: z_l ~ N(0, I) per transition; V and Q (Eq. 45, 47), then pi and q (Eq. 49), then Vbar.
        z = self.latent(batch.terminated.shape[0], explore=True)
        samples = self.samples(batch.obs, z, batch.action_mask)
        actions = torch.cat([s.critic_input for s in samples], dim=1)
        log_pi = torch.cat([s.log_prob_mean for s in samples], dim=1)  # the sample's log pi for Box actions
        # One MI bound serves Eq. 46 (detached) and Eq. 49: the critic step leaves pi and q unchanged.
        mi = self.mi_bound(batch.obs, actions, batch.joint_alive(self.groups))
        v_loss, q_loss = self.v_loss(batch, actions, log_pi, mi), self.q_loss(batch)
        self.optimize("critic", v_loss + q_loss)
        actor_loss = self.actor_loss(batch, actions, log_pi, mi)
        self.optimize("actor", actor_loss)
        polyak(self.target_v, self.v, self.config.tau)
        return {"loss_v": v_loss.detach(), "loss_q": q_loss.detach(), "loss_policy": actor_loss.detach(),
                "mi_bound": mi.mean().detach(), "entropy": -log_pi.mean().detach()}

    def values(self, obs: dict[str, Tensor], target: bool = False) -> Tensor:
        """V^i(x) (or Vbar^i) of every controlled agent: [B, N]."""
        x = flatten_agents([obs[g] for g in self.groups])
        x = x.unsqueeze(1).expand(-1, self.n_agents, -1)
        return (self.target_v if target else self.v)(x).squeeze(-1)

    @torch.no_grad()
    def v_target(self, batch: Transition, actions: Tensor, log_pi: Tensor, mi: Tensor) -> Tensor:
        """V_hat^i(x) = min_k Q^{i,k}(x, a) - beta log pi^i(a^i | o^i, z) + MI bound `mi` (Eq. 46): [B, N]."""
        q_min = self.critics.min_value(joint_input([batch.obs[g] for g in self.groups], actions))
        return q_min - self.config.beta * log_pi + mi

    def v_loss(self, batch: Transition, actions: Tensor, log_pi: Tensor, mi: Tensor) -> Tensor:
        """L_V = 1/2 (V^i(x) - V_hat^i(x))^2 (Eq. 45), mean over batch and agents present."""
        error = self.values(batch.obs) - self.v_target(batch, actions, log_pi, mi)
        return agent_mean(0.5 * error.square(), batch.joint_alive(self.groups))

    def q_loss(self, batch: Transition) -> Tensor:
        """L_Q = 1/2 (Q^{i,k}(x, a) - Q_hat^i)^2 on the stored joint action (Eq. 47), summed over twins,
        with Q_hat^i = r^i + gamma (1 - d) Vbar^i(x') (Eq. 48)."""
        with torch.no_grad():
            target = td_target(batch, list(self.groups), self.config.gamma, self.values(batch.next_obs, target=True))
        stored = [action_features(batch.action[g], spec.action_space) for g, spec in self.groups.items()]
        inputs = joint_input([batch.obs[g] for g in self.groups], stored)
        alive = batch.joint_alive(self.groups)
        return sum(agent_mean(0.5 * (q - target).square(), alive) for q in self.critics.values(inputs))

    def actor_loss(self, batch: Transition, actions: Tensor, log_pi: Tensor, mi: Tensor) -> Tensor:
        """L_pi,q = -Q^{i,1}(x, a) + beta log pi^i(a^i | o^i, z) - MI bound `mi` (Eq. 49)."""
        # Agent i's loss moves phi^i only: a^j of the others enters Q^i as a constant.
        inputs = joint_input([batch.obs[g] for g in self.groups], actions, own_action_gradient_only=True)
        with frozen(self.critics):
            q1 = self.critics.values(inputs)[0]  # the first twin, as Eq. 49 writes (not the minimum)
        return agent_mean(-q1 + self.config.beta * log_pi - mi, batch.joint_alive(self.groups))


@dataclass
class MAACConfig(VM3ACConfig):
    beta: float = 0.0
    """No entropy or MI bonus: MA-AC is "a variant of VM3-AC (beta = 0) without the latent variable" (002 Sec. 6)."""
    latent_dim: int = 0
    """No latent variable (002 Sec. 6)."""


@register("ma_ac", "MA-AC (002 baseline): VM3-AC with beta = 0 and no latent variable",
          Capabilities(discrete=True, continuous=True, heterogeneous=True))
class MAAC(VM3AC):
    Config = MAACConfig
