"""LOLA: Learning with Opponent-Learning Awareness (Foerster et al., AAMAS 2018), policy-gradient
version (LOLA-PG), a baseline of paper 004 on the 2-agent Spread.

A LOLA agent 1 ascends its return after one anticipated naive gradient step of its opponent 2,
V^1(theta_1, theta_2 + eta grad_2 V^2); to first order in eta (LOLA Eq. 4 and Sec. 3.3, LOLA-PG):

    Delta theta_1 = delta grad_1 V^1 + delta eta (grad_2 V^1)^T grad_1 grad_2 V^2,

(and symmetrically for agent 2), with every term estimated from a batch of on-policy episodes by the
likelihood-ratio estimators of LOLA-PG:

    grad_j V^i         ~ 1/B sum_b sum_t gamma^t A^i_t grad_j log pi_j(a^j_t | o^j_t)
    grad_1 grad_2 V^2  ~ 1/B sum_b sum_t gamma^t rbar^2_t (sum_{t'<=t} grad_1 log pi_1(a^1_t'))
                                                        (sum_{t'<=t} grad_2 log pi_2(a^2_t'))^T

where A^i_t is agent i's advantage against its value baseline V_i (the Monte Carlo return to the
end of the trace bootstrapped from V_i there, minus V_i(s_t)), rbar^j_t = r^j_t - (mean of r^j over
the batch) and t counts steps since the trace began. Nothing second-order is approximated here: the
correction is computed exactly for the estimator with autograd, as the official code does,
    grad_1 [ stop(grad_2 V^1) . grad_2 Vhat^2 ],  Vhat^2 = 1/B sum gamma^t rbar^2_t C^1_t C^2_t,
C^i_t = sum_{t'<=t} log pi_i(a^i_t'), i.e. a Hessian-vector product through the opponent's gradient
step (`torch.autograd.grad(..., create_graph=True)`).

What the official code fixes (github.com/alshedivat/lola, commit 4db697a0bbdcb7d6b346158e9efcdabdfafa16b0:
lola/corrections.py, lola/train_pg.py, lola/train_cg.py, lola/networks.py, scripts/run_lola.py):
- the estimators above (corrections.py: `v_0_pi_1` for grad_2 V^1 with advantage = `target - value`,
  `target` = discounted return to the trace's end + gamma^(T-t) V(s_T); `v_0`/`v_1` for the
  second-order term with the batch-mean-centred, gamma^t-weighted reward; `multiply0` then
  `flatgrad` for the correction), one update per batch of whole traces, only two agents;
- plain gradient steps theta += lr * delta (no Adam), lr 1 on IPD/IMP and 0.005 on the Coin Game,
  4000 traces of 150 steps per batch, gamma 0.96 (0.9 on IMP); the value baseline trained by one
  plain gradient step of 1/2 (target - V)^2 per batch (learning rate 1);
- networks: a 5-logit table (IPD, IMP) or one hidden layer of 32 (`hidden`); on the Coin Game two
  3x3 convolutions of 20 channels and an LSTM of 32 with the value head on the conv features.
- eta: the PG code has no separate eta. Its log pi(a) is `reduce_mean` over the |A| actions, i.e.
  log pi(a) / |A|, so its steps are delta = lr 2/|A| and eta = 2/|A|^2 (IPD, IMP: delta = lr,
  eta = 0.5; Coin Game: delta = lr / 2, eta = 1/8). Here log pi is exact and eta is explicit.

What they leave open and what we chose:
- N agents: the Taylor term is pairwise; for N > 2 each agent sums its corrections over the other
  agents j, grad_i sum_{j != i} stop(grad_j V^i) . grad_j Vhat^j_{(i,j)} (Vhat for the pair (i, j)
  carries C^i C^j), a direct extension that 004 does not use (it runs LOLA on Spread N = 2 only).
  N = 1 is refused. One agent group (`heterogeneous=False`).
- Batched envs: the trainer's rollout of `rollout_length` steps of B sub-environments is the batch;
  its episode pieces are the traces (C, gamma^t and the discounted return restart where an episode
  ends), and sums over steps are averaged over the B sub-environments. With rollout_length a
  multiple of the episode length (25 on Spread) the traces are whole episodes, as in LOLA-PG.
- Networks: MA-PPO's (vimarl.algos.mappo, whose value/advantage/log-likelihood code this module
  reuses): per-agent policies pi_i(a_i | o_i) with their own weights (two hidden layers) and per-agent
  value baselines V_i(x) over all agents' observations (LOLA's baselines read the full game state).
  The advantage is GAE with lambda = 1 by default, which is exactly LOLA's bootstrapped Monte Carlo
  target; Box actions use masac's tanh Gaussian.
- Optimisers: `optimizer="sgd"` is LOLA's plain step theta += lr Delta; "adam" feeds -Delta to Adam.
  The critic takes `critic_steps` Adam steps on the whole rollout per update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.func import functional_call

from vimarl.algos.base import Algorithm, Capabilities, adam, agent_mean, register
from vimarl.algos.mappo import MAPPO
from vimarl.algos.masac import AgentPolicies
from vimarl.buffer import Transition
from vimarl.envs.base import GroupSpec
from vimarl.errors import VimarlError
from vimarl.nn.centralized import AgentMLP


@dataclass
class LOLAConfig:
    lr: float = 0.005
    """delta, the policies' step size (official code, Coin Game: lr 0.005 with plain gradient steps; 1 on
    IPD/IMP with tabular policies)."""
    eta: float | None = None
    """eta, the opponent's anticipated learning rate weighting the LOLA correction (LOLA Eq. 4); None: lr,
    the opponent's actual step size (as in the official exact-LOLA runs, lr = lr_correction = 1); 0:
    the naive policy-gradient learner (NL-PG). The official PG code's effective value is 2/|A|^2 (see
    the module docstring)."""
    gamma: float = 0.96
    """Discount (official code: 0.96 on IPD and the Coin Game, 0.9 on IMP)."""
    gae_lambda: float = 1.0
    """lambda of the advantage; 1 is LOLA's Monte Carlo return to the trace's end bootstrapped from V there."""
    rollout_length: int = 25
    """Vectorised env steps per update, each sub-environment's piece a trace (LOLA: batches of whole
    traces; 25 is one Spread episode, so num_envs is the batch of episodes)."""
    optimizer: Literal["sgd", "adam"] = "sgd"
    """Policy steps: plain gradient ascent theta += lr Delta (official code) or Adam on -Delta."""
    critic_lr: float = 1e-3
    """Adam learning rate of the value baselines (the official code's plain step of size 1 suits only its
    tabular/linear values)."""
    critic_steps: int = 1
    """Gradient steps of the value baselines per rollout (official code: 1)."""
    hidden_dim: int = 32
    """Units of each of the two ReLU hidden layers of every policy and value network (official code: one
    hidden layer of 32, `--hidden`)."""
    max_grad_norm: float | None = None
    """Clip of the norm of Delta over all policy parameters (none in the official code)."""


def segment_starts(batch: Transition, steps: int) -> Tensor:
    """[T, B] bool: step t of sub-environment b begins a trace (the rollout's first step, or the step
    after an episode ended)."""
    ended = batch.terminated.bool()
    if batch.truncated is not None:
        ended = ended | batch.truncated.bool()
    ended = ended.view(steps, -1)
    return torch.cat([torch.ones_like(ended[:1]), ended[:-1]], dim=0)


def trace_positions(starts: Tensor) -> tuple[Tensor, Tensor]:
    """(index of the step that began each step's trace [T, B], steps since then [T, B])."""
    time = torch.arange(starts.shape[0], device=starts.device).unsqueeze(-1).expand_as(starts)
    first = torch.where(starts, time, torch.zeros_like(time)).cummax(dim=0).values
    return first, time - first


def trace_cumsum(values: Tensor, first: Tensor) -> Tensor:
    """Inclusive sums over time that restart at each trace's first step: [T, B, N] -> [T, B, N]."""
    totals = values.cumsum(dim=0)
    index = first.unsqueeze(-1).expand_as(values)
    before_start = totals.gather(0, index) - values.gather(0, index)
    return totals - before_start


@register("lola", "LOLA-PG (Foerster et al. 2018; 004 baseline on Spread N=2): policy gradients plus the "
          "opponent-learning correction eta (grad_j V^i)^T grad_i grad_j V^j, exact via autograd",
          Capabilities(discrete=True, continuous=True))
class LOLA(Algorithm):
    Config = LOLAConfig

    # The rollout sampler, acting, value baselines, log-likelihoods and advantages are MA-PPO's (same
    # networks and rollout layout).
    sampler = MAPPO.sampler
    act = MAPPO.act
    values = MAPPO.values
    log_probs_and_entropy = MAPPO.log_probs_and_entropy
    advantages = MAPPO.advantages
    advantages_and_returns = MAPPO.advantages_and_returns

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, config: LOLAConfig, device="cpu"):
        super().__init__(groups, state_dim, config, device)
        (self.group, spec), = groups.items()
        self.n_agents = spec.n_agents
        if self.n_agents < 2:
            raise VimarlError(f"lola needs at least 2 agents (the env has {self.n_agents}); "
                              "its correction is over pairs of learners")
        hidden = config.hidden_dim
        self.eta = config.lr if config.eta is None else config.eta
        # Separate weights per agent (no sharing): theta_i is slice i of every policy parameter.
        self.policy = torch.nn.ModuleDict({self.group: AgentPolicies(spec, hidden, shared=False)})
        self.critic = AgentMLP(self.n_agents, self.n_agents * spec.obs_dim, (hidden, hidden), 1, False)
        self.to(self.device)
        policy_optimizer = (torch.optim.SGD(self.policy.parameters(), lr=config.lr) if config.optimizer == "sgd"
                            else adam(self.policy.parameters(), lr=config.lr))
        self.optimizers = {"policy": policy_optimizer, "critic": adam(self.critic.parameters(), lr=config.critic_lr)}

    # --- the LOLA-PG direction -------------------------------------------------------------------

    def _log_probs(self, params: dict[str, Tensor], batch: Transition) -> Tensor:
        """log pi_i(a_i | o_i) of the stored actions under policy parameters `params`: [T B, N]."""
        g = self.group
        distribution = functional_call(self.policy[g], params, (batch.obs[g], batch.action_mask.get(g)))
        return distribution.log_prob(batch.action[g])

    def directions(self, batch: Transition, advantages: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(grad_i V^i, sum_{j != i} grad_i [stop(grad_j V^i) . grad_j Vhat^j]) for every policy
        parameter, agent i in slice i of its leading axis (ascent directions; `advantages` [T B, N])."""
        steps, n = self.config.rollout_length, self.n_agents
        params = dict(self.policy[self.group].named_parameters())
        leaves = list(params.values())
        envs = advantages.shape[0] // steps
        first, age = trace_positions(segment_starts(batch, steps))
        discount = self.config.gamma ** age.to(advantages.dtype)  # gamma^t, t counted within the trace
        alive = batch.joint_alive(self.groups)
        log_probs = self._log_probs(params, batch)
        if alive is not None:  # an agent that has left takes no actions
            log_probs = log_probs * alive
        weighted = (discount.reshape(-1, 1) * advantages.detach()).view(-1, n)
        agents = torch.arange(n, device=advantages.device)

        def value_gradient(shift: int, **kwargs) -> tuple[Tensor, ...]:
            """Slice j of each result: grad_j V^((j - shift) mod N), one backward pass for all agents."""
            surrogate = (weighted[:, (agents - shift) % n] * log_probs).sum() / envs
            return torch.autograd.grad(surrogate, leaves, **kwargs)

        own = value_gradient(0, retain_graph=self.eta > 0)
        correction = [torch.zeros_like(p) for p in leaves]
        if self.eta == 0:
            return list(own), correction
        # The opponent's role reads a copy of the parameters, so that the outer gradient reaches
        # theta_i only through agent i's own log-likelihoods, as with the two networks of LOLA.
        opponent_params = {name: p.detach().requires_grad_() for name, p in params.items()}
        opponent_log_probs = self._log_probs(opponent_params, batch)
        if alive is not None:
            opponent_log_probs = opponent_log_probs * alive
        own_cumulative = trace_cumsum(log_probs.view(steps, envs, n), first)
        opponent_cumulative = trace_cumsum(opponent_log_probs.view(steps, envs, n), first)
        rewards = batch.reward[self.group]
        centred = ((rewards - rewards.mean(dim=0)) * discount.reshape(-1, 1)).view(steps, envs, n)
        for shift in range(1, n):  # the pairs (i, i + shift): N - 1 batched passes
            cross = value_gradient(shift, retain_graph=True)  # slice j: grad_j V^i, i = j - shift
            # Vhat^j for the pair (i, j): the log-likelihood product estimator of LOLA-PG.
            pair_value = (centred * own_cumulative[:, :, (agents - shift) % n] * opponent_cumulative).sum() / envs
            opponent_step = torch.autograd.grad(pair_value, list(opponent_params.values()), create_graph=True)
            shaping = sum((c.detach() * s).sum() for c, s in zip(cross, opponent_step))
            for total, part in zip(correction, torch.autograd.grad(shaping, leaves, retain_graph=shift < n - 1)):
                total.add_(part)
        return list(own), correction

    # --- the update ------------------------------------------------------------------------------

    def update(self, batch: Transition) -> dict[str, Tensor]:
        config = self.config
        advantages, returns = self.advantages_and_returns(batch)
        own, correction = self.directions(batch, advantages)
        leaves = list(self.policy.parameters())
        optimizer = self.optimizers["policy"]
        optimizer.zero_grad(set_to_none=True)
        for p, g, c in zip(leaves, own, correction):
            p.grad = -(g + self.eta * c)  # the optimisers descend; LOLA ascends Delta
        norm = torch.nn.utils.clip_grad_norm_(leaves, float("inf") if config.max_grad_norm is None
                                              else config.max_grad_norm)
        optimizer.step()
        present = batch.joint_alive(self.groups)
        obs = {self.group: batch.obs[self.group]}
        for _ in range(config.critic_steps):
            value_loss = agent_mean(0.5 * (self.values(obs) - returns).square(), present)
            self.optimize("critic", value_loss)
        with torch.no_grad():
            _, entropy = self.log_probs_and_entropy(batch)
            return {"loss_v": value_loss.detach() if config.critic_steps else torch.zeros(()),
                    "grad_norm": norm.detach(),
                    "pg_norm": torch.linalg.vector_norm(torch.stack([g.norm() for g in own])),
                    "correction_norm": torch.linalg.vector_norm(torch.stack([c.norm() for c in correction])),
                    "entropy": agent_mean(entropy, present)}
