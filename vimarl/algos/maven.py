"""MAVEN: multi-agent variational exploration (Mahajan et al., 2019), on MA-AC as paper 002 runs it.

A latent z is drawn once per episode by a hierarchical policy z ~ pi_z(z | s_0) and held fixed by
every agent for the whole episode, so that each value of z commits the team to one joint mode of
behaviour ("committed exploration"). The agents' policies and the centralised critics are conditioned
on z, and a mutual-information term I(z; tau) between z and the trajectory keeps the modes apart,
through the variational lower bound with a discriminator q_upsilon(z | tau):

    I(z; tau) >= H(z) + E_{z, tau}[ log q_upsilon(z | tau) ],
    L_MI      = lambda_MI E_D[ -log q_upsilon(z | sigma(tau)) ]        (cross-entropy on the true z),
    J_V(theta_z) = E_{s_0, z ~ pi_z(.|s_0)}[ R(tau | z) ]              (the hierarchical policy's objective),

with sigma(tau) a summary of the trajectory. 002 ports MAVEN to continuous actions "on top of MA-AC"
(Sec. 6; MA-AC is VM3-AC with beta = 0 and no per-step latent, `vimarl.algos.vm3ac.MAAC`). Here the
MA-AC losses (002 Eq. 45, 47, 49 with beta = 0) are unchanged on inputs extended by onehot(z):

    pi^i(a^i | o^i, z),  Q^{i,k}(x, z, a),  V^i(x, z),  Vbar^i(x', z)      (z the episode's stored z),
    L_actor = E[ -Q^{i,1}(x, z, a) ] + lambda_MI E[ -log q_upsilon(z | x, a) ],   a ~ pi(.|o, z) reparameterised,
    L_z     = -sum_b log pi_z(z_b | x_0,b) R_b + c_H sum_b log pi_z(z_b | x_0,b)   (EZ agent, below),

where x = (o^1, ..., o^N) without z (002's critic input; the discriminator must not see z itself).

What the paper and the official code fix (github.com/AnujMahajanOxf/MAVEN, commit
be975c5f80c74a17674d6b74905f15c8dc7175bf, maven_code/src):
- z is categorical with `noise_dim` values, one-hot, drawn at each episode's reset from the state
  of its first step (runners/parallel_runner.py `reset`: noise_distrib.sample(state[:, 0])) and
  stored with the episode (`batch["noise"][:, 0]`), which the learner reads back.
- The hierarchical policy is either uniform (`noise_bandit: False`, modules/bandits/uniform.py) or
  the "EZ" agent (`noise_bandit: True, bandit_policy: True`, modules/bandits/reinforce_hierarchial.py):
  a 1-hidden-layer (128) softmax policy on s_0, trained with REINFORCE on a FIFO of (s_0, z, episode
  return) triples (bandit_buffer 512), bandit_iters 8 minibatches of bandit_batch 64 after every
  collection, loss -dot(log pi_z, R) + entropy_scaling * sum(log pi_z), no baseline; its Adam uses
  the agents' lr. The camera-ready runs (plot_keys/) all use it.
- The MI loss (learners/noise_q_learner.py) is the cross-entropy of a discriminator MLP on the true
  z, weighted by `mi_loss`, added to the agents' loss, so its gradient reaches the agents (through
  softmax(Q) of every agent, the differentiable stand-in for the joint action) and the
  discriminator. Its input is (s_t, softmax Q_t of all agents): per step (`rnn_discrim: False`, the
  loss averaged over the valid steps) or a GRU over the episode's steps whose last hidden state is
  classified once per episode (`rnn_discrim: True`, rnn_agg_size 32, the camera-ready setting).
- Camera-ready values (plot_keys/): noise_dim 16 (4 on micro_corridor, 32 on 4step), mi_loss 0.01
  (0.001 on 2_corridors, 1 on the matrix game), entropy_scaling 0.01 (0.001 / 0.1 on some maps).
- Evaluation draws z from the learned pi_z, and again from a uniform z (`test_uniform`, run.py).

What 002 leaves open and what we chose:
- 002 says only that MAVEN is "implemented on top of MA-AC" (Sec. 6) and gives one hyperparameter
  set for every compared algorithm (Table 1); nothing on noise_dim, lambda_MI, the z policy or the
  discriminator. We take the camera-ready MAVEN values (noise_dim 16, lambda_MI 0.01, EZ agent
  with entropy weight 0.01) and Table 1 for everything MA-AC has.
- How z enters the networks: MAVEN's agents multiply the GRU output by a hypernetwork W(z, id) and
  its mixer reads (s, z); MA-AC has MLPs, so onehot(z) is appended to every agent's observation,
  which puts it in the policy input [o^i, z] and (once per agent) in the critics' x. The stored z
  serves both x and x' of a transition: z is the episode's, also at a truncated episode's s'.
- The trajectory summary: MA-AC replays single transitions, not episodes, so the GRU aggregator
  cannot run; we use MAVEN's per-step variant q_upsilon(z | x_t, a_t), with a_t the current
  policy's reparameterised joint action (its gradient reaches every agent, like softmax(Q) does)
  and x_t the joint observation, trained on the replay's transitions.
- The return R of an episode for pi_z: the per-step mean of the agents' rewards, summed over the
  episode's steps (MAVEN has one team reward). One z-policy minibatch step per `update` call
  (MAVEN: 8 per collection of batch_size_run episodes), with the agents' optimiser settings (Adam,
  lr). The discriminator is a 2-layer MLP of `hidden_dim` like every other network (002 Table 1;
  MAVEN: discrim_size 64, discrim_layers 3 in noisemix_smac.yaml), optimised with the actor.
- Evaluation plays the policies' mean actions (as MA-AC) with z ~ pi_z(.|x_0) for each episode,
  and reports the uniform-z evaluation as `eval_return_mean/z_uniform`.

Mechanics: the z of each training sub-environment lives in `episode_z` [B]; `observe` keeps the z
the step was taken with (`acted_z`, stored through `replay_fields` for the updates), adds the step's
reward to the episode return and, where the sub-environment's episode ended, files (x_0, z, R) in
the z policy's FIFO and draws a new z from the next episode's first observation. Warm-up steps
(actions chosen by the trainer) get a z too. Evaluation (`execution`) starts every episode with a
fresh z and hands the training state back afterwards; checkpoints carry it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vimarl.algos.base import Capabilities, adam, register
from vimarl.algos.vm3ac import MAAC, MAACConfig
from vimarl.buffer import ExtraFields, Transition
from vimarl.envs.base import GroupSpec, TimeStep
from vimarl.errors import VimarlError
from vimarl.nn.centralized import critic_width, flatten_agents
from vimarl.nn.mlp import mlp

EPISODE_Z = "maven_z"
"""Replay field holding the index of the z each transition was collected with."""


@dataclass
class MAVENConfig(MAACConfig):
    noise_dim: int = 16
    """Number of values of the categorical z, fed as a one-hot (MAVEN noise_dim; 16 in most camera-ready
    runs, plot_keys/ of the official code; 1 makes z constant and MAVEN MA-AC with an extra input)."""
    mi_weight: float = 0.01
    """lambda_MI, weight of the discriminator's cross-entropy -log q(z | x_t, a_t) in the actor loss
    (MAVEN mi_loss: 0.01 in the camera-ready SMAC runs, 0.001 on 2_corridors, 1 on the matrix game)."""
    z_policy: Literal["reinforce", "uniform"] = "reinforce"
    """The hierarchical policy pi_z(z | x_0): "reinforce" MAVEN's EZ agent (a softmax MLP on the
    first step's joint observation, REINFORCE on episode returns; noise_bandit: True in every
    camera-ready run), "uniform" z ~ U{0..noise_dim-1} (noise_bandit: False, the code's default)."""
    z_entropy_weight: float = 0.01
    """c_H in the EZ agent's loss -sum log pi_z(z|x_0) R + c_H sum log pi_z(z|x_0) (MAVEN
    entropy_scaling: 0.01 in most camera-ready runs, default.yaml 0.001)."""
    z_buffer_size: int = 512
    """Episodes (x_0, z, R) the EZ agent's FIFO keeps (MAVEN bandit_buffer 512)."""
    z_batch_size: int = 64
    """Episodes per EZ agent minibatch, drawn uniformly with replacement (MAVEN bandit_batch 64)."""


@register("maven", "MAVEN (Mahajan et al. 2019) on MA-AC as in 002: a categorical z per episode from a "
          "hierarchical policy on the first state, policies and critics conditioned on z, MI(z; trajectory) "
          "through a discriminator q(z | x_t, a_t)",
          Capabilities(discrete=True, continuous=True, heterogeneous=True))
class MAVEN(MAAC):
    Config = MAVENConfig

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: MAVENConfig, device="cpu"):
        if config.latent_dim:
            raise VimarlError(f"maven's z is categorical (noise_dim); latent_dim={config.latent_dim} would add "
                              f"VM3-AC's per-step Gaussian latent: leave latent_dim at 0")
        if config.z_policy == "reinforce" and min(config.z_buffer_size, config.z_batch_size) < 1:
            raise VimarlError(f"maven's z policy needs z_buffer_size and z_batch_size of at least 1, got "
                              f"{config.z_buffer_size} and {config.z_batch_size}; raise them or set z_policy=uniform")
        # MA-AC on observations extended by onehot(z): pi^i, Q^{i,k}, V^i and Vbar^i all read z.
        with_z = {g: replace(spec, obs_dim=spec.obs_dim + config.noise_dim) for g, spec in groups.items()}
        super().__init__(with_z, state_dim, config, device)
        self.groups = groups  # acting, the replay and the trainer see the environment's observations
        hidden = config.hidden_dim
        x_dim = sum(spec.n_agents * spec.obs_dim for spec in groups.values())
        self.discriminator = mlp(critic_width(groups), (hidden, hidden), config.noise_dim).to(self.device)
        self.z_policy = mlp(x_dim, (128,), config.noise_dim).to(self.device)  # the EZ agent's Policy (128 units)
        self.optimizers["actor"] = adam([*self.policy.parameters(), *self.discriminator.parameters()], lr=config.lr)
        self.optimizers["z_policy"] = adam(self.z_policy.parameters(), lr=config.lr)
        # The EZ agent's FIFO of finished episodes, one spare last row that absorbs the writes of the
        # sub-environments whose episode goes on (writes without a host sync).
        size = config.z_buffer_size
        self.register_buffer("z_memory_x0", torch.zeros(size + 1, x_dim, device=self.device))
        self.register_buffer("z_memory_z", torch.zeros(size + 1, dtype=torch.int64, device=self.device))
        self.register_buffer("z_memory_return", torch.zeros(size + 1, device=self.device))
        self.register_buffer("z_memory_count", torch.zeros((), dtype=torch.int64, device=self.device))
        # Per training sub-environment: the episode's z, its first joint observation and return so far.
        self.episode_z: Tensor | None = None
        self.episode_x0: Tensor | None = None
        self.episode_return: Tensor | None = None
        self.acted_z: Tensor | None = None  # the z the last observed step was taken with
        self.uniform_z = config.z_policy == "uniform"  # draw z uniformly (also in the "uniform" evaluation)
        self.last_mi_loss = torch.zeros((), device=self.device)  # the last actor step's L_MI, for the metrics

    # --- z: the episode's latent ------------------------------------------------------------

    def joint_obs(self, obs: dict[str, Tensor]) -> Tensor:
        """x = (o^1, ..., o^N) of the controlled groups, [B, sum_g N_g O_g], without z."""
        return flatten_agents([obs[g] for g in self.groups])

    def with_z(self, obs: dict[str, Tensor], z: Tensor) -> dict[str, Tensor]:
        """[o^i, onehot(z)] for every agent: z [B] indices -> {group: [B, N_g, O_g + noise_dim]}."""
        one_hot = F.one_hot(z, self.config.noise_dim).to(next(iter(obs.values())).dtype)
        return {g: self.with_latent(obs[g], one_hot) for g in self.groups}

    @torch.no_grad()
    def draw_z(self, x0: Tensor) -> Tensor:
        """z ~ pi_z(. | x_0) for episodes starting at x0 [B, X] (uniform with z_policy=uniform or in the
        uniform evaluation): [B] indices."""
        if self.uniform_z:
            return torch.randint(self.config.noise_dim, x0.shape[:1], device=x0.device)
        return torch.distributions.Categorical(logits=self.z_policy(x0)).sample()

    def start_episodes(self, obs: dict[str, Tensor], starting: Tensor | None = None) -> None:
        """New episodes in the sub-environments `starting` ([B] bool; None: all, forgetting any
        carried state): z drawn from their first observations `obs`, returns from zero."""
        x0 = self.joint_obs(obs)
        z = self.draw_z(x0)
        if starting is None:
            self.episode_z, self.episode_x0, self.episode_return = z, x0, x0.new_zeros(x0.shape[0])
            return
        self.episode_z = torch.where(starting, z, self.episode_z)
        self.episode_x0 = torch.where(starting.unsqueeze(-1), x0, self.episode_x0)
        self.episode_return = self.episode_return.masked_fill(starting, 0.0)

    def current_z(self, obs: dict[str, Tensor]) -> Tensor:
        """The z of each sub-environment's running episode, [B]; new episodes for an env of another size."""
        if self.episode_z is None or self.episode_z.shape[0] != next(iter(obs.values())).shape[0]:
            self.start_episodes(obs)
        return self.episode_z

    def observe(self, step: TimeStep, actions: dict[str, Tensor], next_step: TimeStep) -> None:
        self.acted_z = self.current_z({g: step.groups[g].obs for g in self.groups})  # warm-up never calls act
        rewards = torch.cat([next_step.groups[g].reward for g in self.groups], dim=1)
        self.episode_return = self.episode_return + rewards.mean(-1)
        done = next_step.done
        if self.config.z_policy == "reinforce":
            self.remember_episodes(done)
        # After auto-reset next_step holds the next episode's first observations. Every row draws and
        # only the rows whose episode ended keep the draw: no host sync on `done`.
        self.start_episodes({g: next_step.groups[g].obs for g in self.groups}, done)

    @torch.no_grad()
    def remember_episodes(self, done: Tensor) -> None:
        """File (x_0, z, R) of the episodes that ended (`done` [B]) in the FIFO, oldest overwritten."""
        size = self.config.z_buffer_size
        slots = (self.z_memory_count + done.long().cumsum(0) - 1) % size
        slots = torch.where(done, slots, size)  # going on: the spare row
        self.z_memory_x0[slots] = self.episode_x0
        self.z_memory_z[slots] = self.episode_z
        self.z_memory_return[slots] = self.episode_return
        self.z_memory_count += done.sum()

    def replay_fields(self) -> ExtraFields:
        return {EPISODE_Z: {next(iter(self.groups)): ((), torch.int64)}}

    def replay_values(self, actions: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        # `observe` ran first for this step and may already have drawn the next episode's z.
        z = self.acted_z if self.acted_z is not None else self.episode_z
        return {EPISODE_Z: {next(iter(self.groups)): z}}

    def stored_z(self, batch: Transition) -> Tensor:
        return batch.extra[EPISODE_Z][next(iter(self.groups))]

    def evaluation_modes(self) -> dict[str, str]:
        # MAVEN's test_uniform runs, next to the learned pi_z.
        return {} if self.config.z_policy == "uniform" else {"z_uniform": "uniform"}

    @contextmanager
    def execution(self, mode: str | None = None) -> Iterator[None]:
        """Evaluation episodes draw their own z (uniform in mode "uniform"); training's are kept for after."""
        carried = self.episode_z, self.episode_x0, self.episode_return, self.acted_z, self.uniform_z
        self.episode_z = self.episode_x0 = self.episode_return = self.acted_z = None
        self.uniform_z = self.uniform_z or mode == "uniform"
        try:
            yield
        finally:
            self.episode_z, self.episode_x0, self.episode_return, self.acted_z, self.uniform_z = carried

    def get_extra_state(self) -> dict[str, Any]:
        carried = {"episode_z": self.episode_z, "episode_x0": self.episode_x0,
                   "episode_return": self.episode_return, "acted_z": self.acted_z}
        return {**super().get_extra_state(), "maven": carried}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        for key, value in state.pop("maven").items():
            setattr(self, key, None if value is None else value.to(self.device))
        super().set_extra_state(state)

    # --- acting and learning -----------------------------------------------------------------

    @torch.no_grad()
    def act(self, obs, graph, *, explore, action_mask=None, state=None):
        z = self.current_z(obs)
        return super().act(self.with_z(obs, z), graph, explore=explore, action_mask=action_mask, state=state)

    def update(self, batch: Transition) -> dict[str, Tensor]:
        z = self.stored_z(batch)
        # MA-AC's V, Q and actor steps (002 App. C, beta = 0) on the z-extended batch; `actor_loss`
        # adds the MI term.
        metrics = super().update(replace(batch, obs=self.with_z(batch.obs, z), next_obs=self.with_z(batch.next_obs, z)))
        metrics["loss_mi"] = self.last_mi_loss
        if self.config.z_policy == "reinforce":
            metrics["loss_z_policy"] = self.z_policy_step()
        return metrics

    def mi_loss(self, x: Tensor, actions: Tensor, z: Tensor) -> Tensor:
        """E[-log q_upsilon(z | x_t, a_t)], the discriminator's cross-entropy on the true z: x [B, X], actions
        [B, N, A] (the joint action's critic features), z [B] -> scalar. Minimising it maximises the
        bound H(z) + E[log q(z | tau)] of I(z; tau), per step (MAVEN's rnn_discrim: False)."""
        logits = self.discriminator(torch.cat([x, actions.flatten(1)], dim=-1))
        return F.cross_entropy(logits, z)

    def actor_loss(self, batch: Transition, actions: Tensor, log_pi: Tensor, mi: Tensor) -> Tensor:
        """MA-AC's -Q^{i,1}(x, z, a) + lambda_MI E[-log q(z | x, a)] with a ~ pi(.|o, z) reparameterised."""
        x = self.joint_obs({g: batch.obs[g][..., :spec.obs_dim] for g, spec in self.groups.items()})
        mi_loss = self.mi_loss(x, actions, self.stored_z(batch))
        self.last_mi_loss = mi_loss.detach()
        return super().actor_loss(batch, actions, log_pi, mi) + self.config.mi_weight * mi_loss

    def z_policy_loss(self, x0: Tensor, z: Tensor, returns: Tensor) -> Tensor:
        """The EZ agent's REINFORCE loss -sum_b log pi_z(z_b | x0_b) R_b + c_H sum_b log pi_z(z_b | x0_b)
        (reinforce_hierarchial.py: sums over the minibatch, no baseline)."""
        log_p = torch.distributions.Categorical(logits=self.z_policy(x0)).log_prob(z)
        return -(log_p * returns).sum() + self.config.z_entropy_weight * log_p.sum()

    def z_policy_step(self) -> Tensor:
        """One EZ minibatch of z_batch_size episodes drawn from the FIFO (nothing moves while it is empty)."""
        stored = self.z_memory_count.clamp(max=self.config.z_buffer_size)
        index = (torch.rand(self.config.z_batch_size, device=self.device) * stored).long()
        loss = self.z_policy_loss(self.z_memory_x0[index], self.z_memory_z[index], self.z_memory_return[index])
        loss = loss * (stored > 0)
        self.optimize("z_policy", loss)
        return loss.detach()
