"""DGN's Jungle on MAgent2 (VPP, paper 000, App. E.3; spec: ENV_SPECS.md §4).

N = 20 agents and 12 foods live on a 30 x 30 grid whose border is wall, so 28 x 28 cells
are free. Foods are MAgent agents of their own group that never move or act. Each step every
agent moves to a neighbouring cell or attacks one: attacking a food pays +1, attacking
another agent pays +2 to the attacker and -4 to the victim, and every attack, hit or miss,
costs 0.01. So the agents do best by sharing the foods peacefully, and the greedy move of
attacking a neighbour costs the team 2. Hit points (agents 400, foods 500, damage 1) make
kills practically impossible within an episode, so food never runs out. Episodes last
`episode_length` steps (120 in DGN, 25 in VPP) and never terminate early.

Actions (Discrete(9), MAgent's layout): 0..4 move by (dx, dy) = (0, -1), (-1, 0), (0, 0),
(+1, 0), (0, +1); 5..8 attack the cell at (0, -1), (-1, 0), (+1, 0), (0, +1). x is the column
and y the row, y growing downwards. Moves into walls or occupied cells fail.

Observation (123, as DGN): the 11 x 11 window around the agent (cells within distance 5)
flattened row-major, +1 where an agent stands (the centre, index 60, is the agent itself),
-1 on a food, 0 elsewhere (walls included); then [y / 30, x / 30], the agent's cell as MAgent
normalises it. The graph links each agent to its `graph_k` = 3 nearest other agents (DGN's
4 nearest including itself), ties by lower index.

Each sub-environment is one MAgent2 GridWorld, stepped in-process one after another. Initial
layouts are drawn here from `vimarl.envs.rng`, keyed on (seed, sub-environment, episode), so a
sub-environment replays the same episodes whatever the batch size. MAgent's own random engine
only orders the attacks within a step, which matters only when an attack kills; it is
re-seeded from the same counters at every reset, so even that replays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from magent2 import gridworld
from torch import Tensor

from vimarl.envs import rng
from vimarl.envs.base import BatchedEnv, Discrete, GroupSpec, GroupStep
from vimarl.envs.graph import Graph, knn_graph
from vimarl.errors import VimarlError


@dataclass
class JungleConfig:
    map_size: int = 30
    """Side of the square map, border walls included (DGN: 30, so 28 x 28 free cells)."""
    n_agents: int = 20
    """Controlled agents (MAgent type "small": hp 400, view 5, attack the 4 neighbours)."""
    n_food: int = 12
    """Foods (MAgent type "big": hp 500, never move or act)."""
    episode_length: int = 120
    """Steps per episode, the only way an episode ends (DGN: 120; VPP's jungle_t25: 25)."""
    graph_k: int = 3
    """Nearest other agents each agent is linked to (DGN: 4 nearest including itself)."""

    def __post_init__(self):
        if self.map_size < 3:
            raise ValueError(f"map_size must be at least 3 (a border wall around free cells), "
                             f"got {self.map_size}")
        if self.n_agents < 2:
            raise ValueError(f"n_agents must be at least 2, got {self.n_agents}")
        if self.n_food < 0:
            raise ValueError(f"n_food must be non-negative, got {self.n_food}")
        free_cells = (self.map_size - 2) ** 2
        if self.n_agents + self.n_food > free_cells:
            raise ValueError(f"n_agents + n_food = {self.n_agents + self.n_food} do not fit in the "
                             f"{free_cells} free cells of a {self.map_size} x {self.map_size} map")
        if self.episode_length < 1:
            raise ValueError(f"episode_length must be at least 1, got {self.episode_length}")
        if not 1 <= self.graph_k <= self.n_agents - 1:
            raise ValueError(f"graph_k must be in 1..{self.n_agents - 1} (n_agents - 1), got {self.graph_k}")


VIEW_RADIUS = 5
"""The agents' view range: an 11 x 11 window, cells farther than 5 left empty."""
VIEW_CELLS = (2 * VIEW_RADIUS + 1) ** 2
OBS_DIM = VIEW_CELLS + 2
N_ACTIONS = 9
AGENT_PRESENCE, FOOD_PRESENCE = 1, 4
"""View channels that mark the agents' group and the foods' group. With minimap_mode MAgent
gives channel 0 to walls, then presence, hp and minimap to each group in the order added."""
AGENTS, FOOD = 0, 1
"""Group order in the MAgent config. Agents come first: MAgent numbers agents across groups in
the order added, so the agents of a fresh episode get ids 0..N-1."""
CELL_STREAM = 0x63656C6C
"""Counter that marks the draws of the initial layout."""
ENGINE_SEED_STREAM = 0x73656564
"""Counter that marks the draw of MAgent's engine seed."""


def magent_config(config: JungleConfig) -> gridworld.Config:
    """DGN's eat.py as a MAgent2 config (spec §4.1).

    A fresh one per GridWorld: GridWorld's constructor rewrites the agent type dicts in place.
    """
    magent = gridworld.Config()
    magent.set({"map_width": config.map_size, "map_height": config.map_size,
                "minimap_mode": True, "embedding_size": 10})
    small = magent.register_agent_type("small", {
        "width": 1, "length": 1, "hp": 400, "speed": 1,
        "view_range": gridworld.CircleRange(VIEW_RADIUS), "attack_range": gridworld.CircleRange(1),
        "damage": 1, "step_recover": 0, "attack_in_group": 1,
        "step_reward": 0, "kill_reward": 0, "dead_penalty": 0, "attack_penalty": -0.01,
    })
    big = magent.register_agent_type("big", {
        "width": 1, "length": 1, "hp": 500, "speed": 0,
        "view_range": gridworld.CircleRange(6), "attack_range": gridworld.CircleRange(0),
        "damage": 0, "step_recover": 0,
    })
    agents = magent.add_group(small)
    food = magent.add_group(big)
    assert (agents, food) == (AGENTS, FOOD)
    eater = gridworld.AgentSymbol(agents, index="any")
    eaten = gridworld.AgentSymbol(food, index="any")
    victim = gridworld.AgentSymbol(agents, index="any")
    magent.add_reward_rule(gridworld.Event(eater, "attack", eaten), receiver=eater, value=1)
    magent.add_reward_rule(gridworld.Event(eater, "attack", victim), receiver=[eater, victim], value=[2, -4])
    return magent


class Jungle(BatchedEnv):
    """DGN's Jungle, B MAgent2 worlds stepped in-process; see the module docstring.

    Dead agents (only reachable when attacks go on for ~100 steps) keep their slot: zero
    observation and reward, no actions taken, and left out of every graph (masked slots).

    Checkpoints hold the counters only: MAgent's C++ state (hit points and all) cannot be
    restored faithfully. Loading one restarts the episodes in progress: each sub-environment
    starts its current episode again from the initial layout, which is a function of the
    counters.
    """

    Config = JungleConfig
    state_dim = 0

    def __init__(self, config: JungleConfig, num_envs: int, seed: int = 0, device="cpu"):
        super().__init__(config, num_envs, seed, device)
        self.max_steps = config.episode_length
        n = config.n_agents
        self.groups = {"agents": GroupSpec(n_agents=n, obs_dim=OBS_DIM, action_space=Discrete(N_ACTIONS),
                                           graph_k=config.graph_k, can_leave=True)}
        self.worlds = [gridworld.GridWorld(magent_config(config)) for _ in range(num_envs)]
        # The free cells (x, y) inside the border wall that MAgent's reset builds.
        inside = torch.arange(1, config.map_size - 1)
        y, x = torch.meshgrid(inside, inside, indexing="ij")
        self.free_cells = torch.stack([x.flatten(), y.flatten()], dim=-1).to(self.device)
        # What the worlds show after the last reset or step, read by _observe. Slot j of
        # sub-environment i holds the agent of MAgent id first_id[i] + j.
        self.first_id = np.zeros(num_envs, dtype=np.int64)
        self.live_slots = [np.zeros(0, dtype=np.int64) for _ in range(num_envs)]
        """The slots of the live agents, in MAgent's buffer order (the order of its arrays)."""
        self.obs = np.zeros((num_envs, n, OBS_DIM), dtype=np.float32)
        self.cells = np.full((num_envs, n, 2), -1, dtype=np.int64)
        """(x, y) of each agent, -1 for dead ones."""

    # -- episodes ----------------------------------------------------------------------------
    def _reset_envs(self, env_mask: Tensor) -> None:
        env_ids = self.env_ids[env_mask]
        episodes = self.episode_index[env_mask]
        n_agents = self.config.n_agents
        # Distinct random free cells: the cells holding the largest keys, made distinct
        # (24 random bits, then the cell index) so that ties never leave the choice to topk.
        n_cells = len(self.free_cells)
        unit = rng.uniform(self.seed, env_ids, episodes, CELL_STREAM, shape=(n_cells,))
        keys = (unit * (1 << 24)).long() * n_cells + torch.arange(n_cells, device=self.device)
        chosen = keys.topk(n_agents + self.config.n_food, dim=-1).indices
        layouts = self.free_cells[chosen].cpu().numpy()
        for env_index, layout in zip(env_ids.tolist(), layouts):
            self._place(env_index, layout[:n_agents], layout[n_agents:])

    def place(self, env_index: int, agent_cells, food_cells) -> GroupStep:
        """Restart sub-environment `env_index` with agents and foods on the given (x, y) cells.

        A helper for tests and demonstrations: agent j goes to agent_cells[j]; when fewer than
        N cells are given, the remaining slots are empty (as dead agents). The step counters
        are left alone. Returns the agents' observations of all sub-environments afterwards.
        """
        if not 0 <= env_index < self.num_envs:
            raise VimarlError(f"env_index must be in 0..{self.num_envs - 1}, got {env_index}")
        agent_cells = np.asarray(agent_cells, dtype=np.int64).reshape(-1, 2)
        food_cells = np.asarray(food_cells, dtype=np.int64).reshape(-1, 2)
        if len(agent_cells) > self.config.n_agents:
            raise VimarlError(f"{len(agent_cells)} agent cells for {self.config.n_agents} agents")
        every = np.concatenate([agent_cells, food_cells])
        if len({tuple(cell) for cell in every.tolist()}) != len(every):
            raise VimarlError("agent and food cells must be distinct")
        if ((every < 1) | (every > self.config.map_size - 2)).any():
            raise VimarlError(f"cells must lie inside the border wall, in 1..{self.config.map_size - 2}")
        self._place(env_index, agent_cells, food_cells)
        return self._observe()[0]["agents"]

    def _place(self, env_index: int, agent_cells: np.ndarray, food_cells: np.ndarray) -> None:
        """Rebuild world `env_index` with the given cells, its engine seeded from the counters."""
        world = self.worlds[env_index]
        episode = self.episode_index[env_index:env_index + 1]
        engine_seed = rng.uniform(self.seed, self.env_ids[env_index:env_index + 1], episode,
                                  ENGINE_SEED_STREAM, shape=(1,))
        world.set_seed(int(engine_seed.item() * (1 << 24)))
        world.reset()  # clears the map and rebuilds the border wall
        handles = world.get_handles()
        world.add_agents(handles[AGENTS], method="custom", pos=agent_cells.tolist())
        world.add_agents(handles[FOOD], method="custom", pos=food_cells.tolist())
        ids = world.get_agent_id(handles[AGENTS])
        # MAgent numbers consecutively in the order added, so slot = id - first id.
        self.first_id[env_index] = ids[0] if len(ids) else 0
        assert (ids == self.first_id[env_index] + np.arange(len(ids))).all()
        self._read(env_index)

    # -- stepping ----------------------------------------------------------------------------
    def _step(self, actions: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        action = actions["agents"].to("cpu", torch.int32).numpy()
        if action.shape != (self.num_envs, self.config.n_agents):
            raise VimarlError(f"jungle actions must be [{self.num_envs}, {self.config.n_agents}], "
                              f"got {list(action.shape)}")
        if action.min() < 0 or action.max() >= N_ACTIONS:
            raise VimarlError(f"jungle actions must be in 0..{N_ACTIONS - 1}, got {action.min()}..{action.max()}")
        rewards = np.zeros((self.num_envs, self.config.n_agents), dtype=np.float32)
        for env_index, world in enumerate(self.worlds):
            agents = world.get_handles()[AGENTS]
            slots = self.live_slots[env_index]
            world.set_action(agents, np.ascontiguousarray(action[env_index, slots]))
            world.step()  # MAgent's done flag (a group wiped out) is ignored, as DGN does
            # Agents killed in this step are still in MAgent's arrays and get this step's reward.
            rewards[env_index, slots] = world.get_reward(agents)
            world.clear_dead()
            self._read(env_index)
        terminated = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        return {"agents": torch.from_numpy(rewards).to(self.device)}, terminated

    def _read(self, env_index: int) -> None:
        """Copy world `env_index`'s live agents into the observation and cell buffers."""
        world = self.worlds[env_index]
        agents = world.get_handles()[AGENTS]
        slots = world.get_agent_id(agents).astype(np.int64) - self.first_id[env_index]
        self.live_slots[env_index] = slots
        view, feature = world.get_observation(agents)
        obs = self.obs[env_index]
        obs[:] = 0
        obs[slots, :VIEW_CELLS] = (view[..., AGENT_PRESENCE] - view[..., FOOD_PRESENCE]).reshape(len(slots), -1)
        # MAgent's features end with [x / W, y / H]; DGN feeds them as [y / H, x / W].
        obs[slots, VIEW_CELLS] = feature[:, -1]
        obs[slots, VIEW_CELLS + 1] = feature[:, -2]
        self.cells[env_index] = -1
        self.cells[env_index, slots] = world.get_pos(agents)

    # -- observations --------------------------------------------------------------------------
    @property
    def agent_cells(self) -> Tensor:
        """[B, N, 2] int64 (x, y) cell of each agent, -1 for dead (or never placed) agents."""
        return torch.tensor(self.cells, device=self.device)

    @property
    def alive(self) -> Tensor:
        """[B, N] bool: the agent is on the map."""
        return self.agent_cells[..., 0] >= 0

    def _observe(self) -> tuple[dict[str, GroupStep], Tensor | None]:
        obs = torch.tensor(self.obs, device=self.device)  # a copy: the buffer changes every step
        zeros = torch.zeros(self.num_envs, self.config.n_agents, device=self.device)
        return {"agents": GroupStep(obs=obs, reward=zeros, graph=self.graph(), alive=self.alive)}, None

    def graph(self) -> Graph:
        """Each live agent's `graph_k` nearest other live agents; dead agents have no links."""
        cells = self.agent_cells
        alive = cells[..., 0] >= 0
        # Dead agents stand off the map, farther from every live agent than any live agent (so
        # nearest-first lists put them last, then their slots are masked), yet close enough to
        # keep the spatial grid of large-N neighbour searches small.
        positions = torch.where(alive.unsqueeze(-1), cells.float(), -2.0 * self.config.map_size)
        return knn_graph(positions, self.config.graph_k).among(alive)

    # -- checkpoints and rendering -------------------------------------------------------------
    def load_state_dict(self, state) -> None:
        """Restore the counters and restart every episode in progress (see the class docstring)."""
        super().load_state_dict(state)
        self.episode_step.zero_()
        self._reset_envs(torch.ones(self.num_envs, dtype=torch.bool, device=self.device))

    def render(self) -> np.ndarray:
        """Sub-environment 0, 8 pixels per cell: walls grey, agents blue, foods green."""
        size, pixels = self.config.map_size, 8
        colour = np.full((size, size, 3), 255, dtype=np.uint8)
        colour[[0, -1], :] = colour[:, [0, -1]] = (128, 128, 128)
        world = self.worlds[0]
        for x, y in world.get_pos(world.get_handles()[FOOD]):
            colour[y, x] = (40, 170, 60)
        for x, y in self.cells[0][self.cells[0, :, 0] >= 0]:
            colour[y, x] = (40, 90, 220)
        return colour.repeat(pixels, axis=0).repeat(pixels, axis=1)
