"""Small test-only environments shared by the test files (import with `from helpers import ...`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vimarl.algos.base import UniformPolicy  # noqa: F401  (the learning tests' random baseline)
from vimarl.buffer import Transition
from vimarl.envs import rng
from vimarl.envs.base import BatchedEnv, Discrete, GroupSpec, GroupStep
from vimarl.envs.graph import Graph


@dataclass
class CounterConfig:
    n_agents: int = 2
    """Agents in the single group."""


class CounterEnv(BatchedEnv):
    """Counts the steps of each episode; every piece of its output depends on that count.

    - obs [B, N, 2]: (steps taken in this episode, a per-agent start value drawn at reset from
      rng.uniform keyed on (seed, env id, episode index)).
    - reward: the action as a float. Terminated when any agent plays TERMINAL_ACTION;
      truncated after max_steps = 3 steps.
    - graph: agent i's one slot is agent (i + 1) % N, real only when the count is odd, so the
      graph right after a reset (count 0) differs from the final graph after one step.
    - action mask: actions 0 and 2 always allowed, action 1 only when the count is even.
    - state [B, 1]: the count plus 100 x the episode index.
    """

    Config = CounterConfig
    state_fields = ("count", "start")
    max_steps = 3
    state_dim = 1
    TERMINAL_ACTION = 2

    def __init__(self, config: CounterConfig | None = None, num_envs: int = 1, seed: int = 0,
                 device="cpu"):
        config = config or CounterConfig()
        super().__init__(config, num_envs, seed, device)
        n = config.n_agents
        self.groups = {"agents": GroupSpec(n_agents=n, obs_dim=2, action_space=Discrete(3),
                                           graph_k=1, has_action_mask=True)}
        self.count = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self.start = torch.zeros(num_envs, n, device=self.device)

    def _reset_envs(self, env_mask: Tensor) -> None:
        self.count[env_mask] = 0
        ids = self.env_ids[env_mask]
        self.start[env_mask] = rng.uniform(self.seed, ids, self.episode_index[env_mask],
                                           shape=(self.config.n_agents,))

    def _step(self, actions: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        action = actions["agents"]
        self.count += 1
        terminated = (action == self.TERMINAL_ACTION).any(-1)
        return {"agents": action.float()}, terminated

    def _observe(self) -> tuple[dict[str, GroupStep], Tensor | None]:
        b, n = self.num_envs, self.config.n_agents
        count = self.count.float().view(b, 1).expand(b, n)
        obs = torch.stack([count, self.start], dim=-1)
        neighbors = ((torch.arange(n, device=self.device) + 1) % n).view(1, n, 1).repeat(b, 1, 1)
        mask = (self.count % 2 == 1).view(b, 1, 1).expand(b, n, 1).clone()
        action_mask = torch.ones(b, n, 3, dtype=torch.bool, device=self.device)
        action_mask[:, :, 1] = (self.count % 2 == 0).view(b, 1)
        step = GroupStep(obs=obs, reward=torch.zeros(b, n, device=self.device),
                         graph=Graph(neighbors, mask), action_mask=action_mask)
        state = (self.count + 100 * self.episode_index).float().view(b, 1)
        return {"agents": step}, state


def constant_actions(env: BatchedEnv, value: int) -> dict[str, Tensor]:
    """Every agent of every sub-environment plays `value`."""
    spec = env.groups["agents"]
    return {"agents": torch.full((env.num_envs, spec.n_agents), value, dtype=torch.int64,
                                 device=env.device)}


def random_discrete_transition(b: int, n: int, obs_dim: int, n_actions: int, terminated: Tensor | None = None,
                               next_alive: Tensor | None = None) -> Transition:
    """b random transitions of one group "agents" of n agents with Discrete(n_actions) actions."""
    g = "agents"
    return Transition(obs={g: torch.randn(b, n, obs_dim)}, graph={g: None}, action_mask={g: None}, state=None,
                      action={g: torch.randint(n_actions, (b, n))}, reward={g: torch.randn(b, n)},
                      next_obs={g: torch.randn(b, n, obs_dim)}, next_graph={g: None}, next_action_mask={g: None},
                      next_state=None, terminated=torch.zeros(b) if terminated is None else terminated,
                      next_alive={g: next_alive})


def assert_same_state(first: torch.nn.Module, second: torch.nn.Module) -> None:
    """Every tensor of the two state dicts is equal (names in the failure message)."""
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


def collect_batch(env: BatchedEnv, algo, steps: int = 3) -> Transition:
    """A small batch of `steps` exploring vectorised steps of `algo`, through the buffer codec."""
    from vimarl.buffer import TransitionCodec
    from vimarl.train import act

    codec = TransitionCodec(algo.groups, env.state_dim)
    step, rows = env.reset(seed=0), []
    for _ in range(steps):
        action = act(algo, step, explore=True)
        next_step = env.step(action)
        rows.append(codec.encode(step, action, next_step))
        step = next_step
    return codec.decode({key: torch.cat([r[key] for r in rows]) for key in rows[0]})


def set_constant(agent_mlp, values):
    """An AgentMLP (own weights per agent) whose output for agent i is values[i]."""
    layers = [m for m in agent_mlp.net if hasattr(m, "weight")]
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            layer.bias.zero_()
        layers[-1].bias[:, 0] = torch.tensor(values)
