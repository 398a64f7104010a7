"""Cooperative treasure collection, as MAAC `fullobs_collect_treasure` (ENV_SPECS §3.1).

Collectors pick up treasures and bring each to the deposit (bank) of the treasure's type.
MAAC: 6 collectors, 2 deposits, 6 treasures. VM3-AC (002 App. F) runs N = 4 and N = 5 agents:
2 banks and N - 2 collectors (the text's "6 hunters" can only be the 6 treasures), with R1 = R2 =
R3 = 5 as in MAAC, and 2-D physical actions; so `n_collectors` 2 or 3 with the other defaults.

World (MAAC's fork physics, see maac.py): collectors size 0.05, mass 1; deposits size 0.075,
mass 2.25; all accel 1.5 (net 2.25 per unit action), max speed 1, colliding. Treasures size
0.025, immovable, not colliding, with a type uniform over the deposits. Reset: agents
U[-1, 1]^2, treasures U[-0.95, 0.95]^2, nobody holding. "Touching" is |p_a - p_b| < size_a + size_b.

Rewards (every term of MAAC's code), with G the global reward shared by everybody:
- G = 5 * #(collector not holding, treasure) touching pairs + 5 * #(collector holding type d,
  deposit d) touching pairs;
- collector: G - 5 * #other collectors touching it - 0.1 * (min distance to any treasure, dead
  ones included, if empty; else distance to the deposit of the type it holds);
- deposit: G - 0.1 * (min distance to a collector holding its type if one exists; else distance
  to the centroid of its n_visible nearest collectors).

MAAC's `post_step` runs after the observations and rewards of a step: each alive treasure, in
index order, is picked up by the first (lowest index) empty collector touching it and moves to
(-999, -999) ("dead"); each treasure dead before this post_step respawns at U[-0.95, 0.95]^2
with a new type; then every holding collector touching its deposit drops the load. So a treasure
is seen at (-999, -999) for one step (`instant_respawn` replaces it at once instead), and a
collector may pick up and drop in the same post_step without the deposit reward. Here the
post_step of step t runs at the start of step t + 1 (nothing changes in between), and not after
an episode's last step.

Observation (n_visible = 7): [p, v, one-hot(held type) for collectors only], then for the
n_visible nearest other agents (ties by index) [their p - p_self, v, encoding (4)], where the
encoding is [0, 0, one-hot(held)] for a collector and [one-hot(deposit type), 0, 0] for a
deposit, then for the n_visible nearest treasures [p - p_self, one-hot(type)]. 86 values for a
collector and 84 for a deposit in MAAC's setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vimarl.envs import rng
from vimarl.envs.particle.base import AgentGroup, ParticleEnv
from vimarl.envs.particle.geometry import pairwise_distance
from vimarl.envs.particle.maac import ForceControlConfig, maac_physics, movement_space
from vimarl.envs.particle.world import World

COLLECTOR_SIZE, DEPOSIT_SIZE, TREASURE_SIZE = 0.05, 0.075, 0.025
COLLECTOR_MASS, DEPOSIT_MASS = 1.0, 2.25
ACCEL, MAX_SPEED = 1.5, 1.0
EVENT_REWARD = 5.0
"""Per collection, per deposit, and per collector-collector collision (VM3-AC's R2, R1, R3)."""
SHAPING = 0.1
DEAD_POSITION = -999.0
TREASURE_BOUND = 0.95
AGENT_STREAM, TREASURE_STREAM, TYPE_STREAM, RESPAWN_STREAM = 0, 1, 2, 3
"""rng streams of the reset draws and of the respawns during an episode."""


@dataclass
class TreasureConfig(ForceControlConfig):
    episode_length: int = 100
    """Steps per episode (100 for treasure collection in MAAC's README)."""
    n_collectors: int = 6
    """Collectors ('hunters'); MAAC 6, VM3-AC N - 2 (2 or 3)."""
    n_deposits: int = 2
    """Deposits ('banks'), one per treasure type."""
    n_treasures: int = 6
    """Treasures alive at once (MAAC and VM3-AC: 6)."""
    n_visible: int = 7
    """Nearest other agents and nearest treasures in each observation (MAAC: 7)."""
    instant_respawn: bool = False
    """Respawn a picked-up treasure at once instead of leaving it at (-999, -999) for one step."""

    def __post_init__(self):
        for name in ("n_collectors", "n_deposits", "n_treasures", "n_visible"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class Treasure(ParticleEnv):
    Config = TreasureConfig
    action_convention = "mpe"
    state_fields = (*ParticleEnv.state_fields, "holding", "treasure_type", "alive")

    def __init__(self, config: TreasureConfig, num_envs: int, seed: int = 0, device="cpu"):
        super().__init__(config, num_envs, seed, device)
        c, d, t = config.n_collectors, config.n_deposits, config.n_treasures
        # The type of the treasure each collector carries, -1 for none.
        self.holding = torch.full((num_envs, c), -1, dtype=torch.int64, device=self.device)
        self.treasure_type = torch.zeros(num_envs, t, dtype=torch.int64, device=self.device)
        self.alive = torch.ones(num_envs, t, dtype=torch.bool, device=self.device)
        self.state_dim += c * d + t * (d + 1)

    def make_world(self) -> World:
        c, d, t = self.config.n_collectors, self.config.n_deposits, self.config.n_treasures
        a = c + d
        return World(self.num_envs, size=[COLLECTOR_SIZE] * c + [DEPOSIT_SIZE] * d + [TREASURE_SIZE] * t,
                     movable=[True] * a + [False] * t, collide=[True] * a + [False] * t, n_agents=a,
                     mass=[COLLECTOR_MASS] * c + [DEPOSIT_MASS] * d + [1.0] * t, accel=[ACCEL] * a,
                     max_speed=[MAX_SPEED] * a + [None] * t, options=maac_physics(self.config.integration),
                     device=self.device)

    def make_groups(self) -> list[AgentGroup]:
        config = self.config
        c, types = config.n_collectors, config.n_deposits  # one deposit per type
        seen_agents = min(config.n_visible, self.world.n_agents - 1)
        seen_treasures = min(config.n_visible, config.n_treasures)
        seen = seen_agents * (4 + 2 * types) + seen_treasures * (2 + types)
        moves = movement_space(config)
        return [AgentGroup("collectors", 0, c, obs_dim=4 + types + seen, action_space=moves),
                AgentGroup("deposits", c, self.world.n_agents, obs_dim=4 + seen, action_space=moves)]

    def reset_entities(self, env_ids: Tensor, episode_ids: Tensor) -> Tensor:
        a = self.world.n_agents
        agents = self.uniform(env_ids, episode_ids, (a, 2), -1.0, 1.0, stream=AGENT_STREAM)
        treasures = self.uniform(env_ids, episode_ids, (self.config.n_treasures, 2), -TREASURE_BOUND,
                                 TREASURE_BOUND, stream=TREASURE_STREAM)
        return torch.cat([agents, treasures], dim=1)

    def _reset_envs(self, env_mask: Tensor) -> None:
        super()._reset_envs(env_mask)
        env_ids = self.env_ids[env_mask]
        unit = rng.uniform(self.seed, env_ids, self.episode_index[env_ids], TYPE_STREAM,
                           shape=(self.config.n_treasures,))
        self.treasure_type[env_mask] = self.draw_type(unit)
        self.holding[env_mask] = -1
        self.alive[env_mask] = True

    def draw_type(self, unit: Tensor) -> Tensor:
        """Uniform treasure types from uniforms in [0, 1)."""
        return (unit * self.config.n_deposits).long().clamp_max(self.config.n_deposits - 1)

    # -- geometry ---------------------------------------------------------------------------------
    def distances(self) -> tuple[Tensor, Tensor, Tensor]:
        """Collector-treasure [B, C, T], collector-deposit [B, C, D] and collector-collector distances."""
        c, a = self.config.n_collectors, self.world.n_agents
        position = self.world.position
        collectors = position[:, :c]
        return (pairwise_distance(collectors, position[:, a:]), pairwise_distance(collectors, position[:, c:a]),
                pairwise_distance(collectors, collectors))

    def carries(self) -> Tensor:
        """[B, C, D] bool: collector c holds a treasure of deposit d's type."""
        return F.one_hot(self.holding + 1, self.config.n_deposits + 1)[..., 1:].bool()

    # -- MAAC's post_step ---------------------------------------------------------------------------
    def _step(self, actions: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        # The previous step's post_step; a fresh episode (step 0) has none pending.
        self.post_step(self.episode_step > 0)
        return super()._step(actions)

    def post_step(self, pending: Tensor) -> None:
        """Pickups, respawns and drops in the sub-environments where `pending [B]` is True."""
        config = self.config
        to_treasure, to_deposit, _ = self.distances()
        touching = (to_treasure < COLLECTOR_SIZE + TREASURE_SIZE) & pending.view(-1, 1, 1)
        was_dead = ~self.alive & pending.unsqueeze(1)
        holding, picked = self.holding, torch.zeros_like(self.alive)
        # A greedy matching in treasure order: which collectors are still empty depends on the
        # earlier treasures, so this loops over the (few) treasures, each step batched over B and C.
        for t in range(config.n_treasures):
            candidates = touching[:, :, t] & (holding < 0) & self.alive[:, t:t + 1]
            first = candidates & (candidates.cumsum(-1) == 1)
            holding = torch.where(first, self.treasure_type[:, t:t + 1], holding)
            picked[:, t] = first.any(-1)
        self.holding = holding
        # Drops come after pickups, so a collector may pick up and deliver in one post_step.
        at_deposit = ((to_deposit < COLLECTOR_SIZE + DEPOSIT_SIZE) & self.carries()).any(-1)
        self.holding = holding.masked_fill(at_deposit & pending.unsqueeze(1), -1)

        respawn = was_dead | picked if config.instant_respawn else was_dead
        draw = rng.uniform(self.seed, self.env_ids, self.episode_index, self.episode_step, RESPAWN_STREAM,
                           shape=(config.n_treasures, 3))
        spot = -TREASURE_BOUND + 2 * TREASURE_BOUND * draw[..., :2]
        treasures = self.world.position[:, self.world.n_agents:]
        treasures = torch.where(picked.unsqueeze(-1), DEAD_POSITION, treasures)
        treasures = torch.where(respawn.unsqueeze(-1), spot, treasures)
        self.world.position = torch.cat([self.world.position[:, :self.world.n_agents], treasures], dim=1)
        self.treasure_type = torch.where(respawn, self.draw_type(draw[..., 2]), self.treasure_type)
        self.alive = (self.alive & ~picked) | respawn

    # -- rewards and observations -----------------------------------------------------------------
    def rewards(self) -> dict[str, Tensor]:
        config = self.config
        to_treasure, to_deposit, to_collector = self.distances()
        empty, carries = self.holding < 0, self.carries()
        collecting = (to_treasure < COLLECTOR_SIZE + TREASURE_SIZE) & empty.unsqueeze(-1)
        delivering = (to_deposit < COLLECTOR_SIZE + DEPOSIT_SIZE) & carries
        team = EVENT_REWARD * (collecting.sum((1, 2)) + delivering.sum((1, 2))).float().unsqueeze(1)  # G

        others = ~torch.eye(config.n_collectors, dtype=torch.bool, device=self.device)
        collisions = ((to_collector < 2 * COLLECTOR_SIZE) & others).sum(-1).float()
        own_deposit = (to_deposit * carries).sum(-1)  # the one deposit of the held type
        shaping = torch.where(empty, to_treasure.min(-1).values, own_deposit)
        collector = team - EVENT_REWARD * collisions - SHAPING * shaping

        to_collectors = to_deposit.transpose(1, 2)  # [B, D, C]
        holder = to_collectors.masked_fill(~carries.transpose(1, 2), float("inf")).min(-1).values
        deposit = team - SHAPING * torch.where(carries.any(1), holder, self.distance_to_crowd(to_collectors))
        return {"collectors": collector, "deposits": deposit}

    def distance_to_crowd(self, to_collectors: Tensor) -> Tensor:
        """[B, D] distance from each deposit to the centroid of its n_visible nearest collectors."""
        config = self.config
        c, k = config.n_collectors, min(config.n_visible, config.n_collectors)
        collectors = self.world.position[:, :c].unsqueeze(1).expand(-1, config.n_deposits, -1, -1)
        centroid = nearest(collectors, to_collectors, k).unflatten(-1, (k, 2)).mean(-2)
        return (centroid - self.world.position[:, c:c + config.n_deposits]).norm(dim=-1)

    def observations(self) -> dict[str, Tensor]:
        config, world = self.config, self.world
        c, a, types = config.n_collectors, world.n_agents, config.n_deposits
        position, velocity = world.position[:, :a], world.velocity[:, :a]
        held = self.carries().float()  # [B, C, D]
        deposit_type = torch.eye(types, device=self.device).expand(self.num_envs, -1, -1)
        encoding = torch.cat([torch.cat([torch.zeros_like(held), held], -1),
                              torch.cat([deposit_type, torch.zeros_like(deposit_type)], -1)], 1)  # [B, A, 2D]
        agents = torch.cat([position.unsqueeze(1) - position.unsqueeze(2),  # [B, A(self), A(other), .]
                            velocity.unsqueeze(1).expand(-1, a, -1, -1),
                            encoding.unsqueeze(1).expand(-1, a, -1, -1)], -1)
        self_distance = pairwise_distance(position, position).diagonal_scatter(
            torch.full((self.num_envs, a), float("inf"), device=self.device), dim1=1, dim2=2)
        agents = nearest(agents, self_distance, min(config.n_visible, a - 1))

        treasure_position = world.position[:, a:]
        type_one_hot = F.one_hot(self.treasure_type, types).float()
        treasures = torch.cat([treasure_position.unsqueeze(1) - position.unsqueeze(2),
                               type_one_hot.unsqueeze(1).expand(-1, a, -1, -1)], -1)
        treasures = nearest(treasures, pairwise_distance(position, treasure_position), min(config.n_visible,
                                                                                      config.n_treasures))
        own = torch.cat([position, velocity], -1)
        seen = torch.cat([agents, treasures], -1)
        return {"collectors": torch.cat([own[:, :c], held, seen[:, :c]], -1),
                "deposits": torch.cat([own[:, c:], seen[:, c:]], -1)}

    def global_state(self) -> Tensor:
        return torch.cat([super().global_state(), self.carries().flatten(1).float(),
                          F.one_hot(self.treasure_type, self.config.n_deposits).flatten(1).float(),
                          self.alive.float()], -1)


def nearest(features: Tensor, by: Tensor, k: int) -> Tensor:
    """[B, A, E, F] features of E entities as seen by A agents -> [B, A, k * F]: the k nearest
    entities by distance `by [B, A, E]`, ties by index (MAAC sorts (distance, index) pairs)."""
    order = by.sort(dim=-1, stable=True).indices[..., :k]
    picked = features.gather(2, order.unsqueeze(-1).expand(-1, -1, -1, features.shape[-1]))
    return picked.flatten(2)
