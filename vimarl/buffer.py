"""Replay storage: one preallocated tensor per field on the training device, ring overwrite.

The buffer itself is a table of named fields (`ReplayBuffer`); `TransitionCodec` maps a
(TimeStep, actions, next TimeStep) triple of any set of agent groups to rows of that table and
back to a `Transition`, graphs included, so algorithms see the structure they were written for.
An algorithm may declare extra per-group fields (`Algorithm.replay_fields`, e.g. MADDPG's relaxed
action samples, the critic inputs it acted with); the codec stores the values it hands for each
step (`Algorithm.replay_values`) and `Transition.extra` gives them back.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import Tensor

from vimarl.envs.base import GroupSpec, TimeStep
from vimarl.envs.graph import Graph
from vimarl.errors import VimarlError


Fields = dict[str, tuple[tuple[int, ...], torch.dtype]]
"""Named per-row fields: {name: (per-row shape, dtype)}."""


@dataclass(frozen=True)
class Sampler:
    """What an algorithm's updates are drawn from (`Algorithm.sampler`); `ReplayBuffer.draw` serves it."""

    kind: Literal["transitions", "windows", "rollout"] = "transitions"
    """transitions: single transitions, uniformly with replacement; windows: `length` consecutive
    steps of one sub-environment, batch_size // length of them (recurrent learners); rollout: every
    stored row in collection order (on-policy learners, whose replay holds exactly one rollout of
    `length` vectorised steps and is cleared after each update)."""
    length: int = 1
    """Steps per window (windows), vectorised steps per rollout (rollout)."""
    episode_aligned: bool = False
    """Windows start only at an episode's first step, where a recurrent state starts from zero
    (pymarl replays whole episodes), instead of at any stored step."""


def _row_bytes(fields: Fields) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in fields.values())


class ReplayBuffer:
    """A ring buffer of `capacity` rows; each field has a fixed per-row shape and dtype.

    With `successors` ({next field: field}, e.g. "agents/next_obs": "agents/obs") the rows come one
    vectorised step of `streams` sub-environments at a time, in the same sub-environment order, and
    a next field is not stored: row i's value is the field of row i + streams (the same
    sub-environment's next step), except where the row ended an episode ("terminated" or
    "truncated" set: its next fields are the final observation, kept in a small side table that
    grows with the number of episode ends stored) and for the newest step (kept aside until the
    following one arrives). Every read gives the values that were added, as if stored in full.
    """

    def __init__(self, capacity: int, fields: Fields, device: str | torch.device = "cpu", seed: int = 0,
                 successors: dict[str, str] | None = None, streams: int = 1):
        self.capacity = int(capacity)
        self.device = torch.device(device)
        self.successors = dict(successors or {})
        self.streams = int(streams)
        stored = {name: spec for name, spec in fields.items() if name not in self.successors}
        if self.successors and self.capacity < self.streams:
            raise VimarlError(f"a replay buffer of {self.capacity} rows cannot hold one step of {self.streams} "
                              f"sub-environments; raise buffer_size to at least num_envs")
        _check_fits(self.capacity, _row_bytes(stored), self.device)
        self.data = {name: torch.zeros((self.capacity, *shape), dtype=dtype, device=self.device)
                     for name, (shape, dtype) in stored.items()}
        self.position = 0  # next row to write
        self.size = 0
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.next_fields = {name: fields[name] for name in self.successors}
        self.head = {name: torch.zeros((self.streams, *shape), dtype=dtype, device=self.device)
                     for name, (shape, dtype) in self.next_fields.items()}
        """The next fields of the newest step, whose successor rows are not stored yet."""
        self.final_seq = torch.full((self.capacity,) if self.successors else (0,), -1, dtype=torch.int64,
                                    device=self.device)
        """Per row: the number of its final observation in `finals` (finals are numbered in the order
        they arrive and live at slot number % final_capacity), or -1 where the episode went on."""
        self.finals: dict[str, Tensor] = {}
        self.final_count = 0  # final observations written so far
        self.oldest_final = 0  # no row refers to a final numbered below this

    def __len__(self) -> int:
        return self.size

    @property
    def final_capacity(self) -> int:
        return next(iter(self.finals.values())).shape[0] if self.finals else 0

    def add(self, rows: dict[str, Tensor]) -> None:
        """Append rows (every field [R, ...]); the oldest rows are overwritten when full."""
        count = next(iter(rows.values())).shape[0]
        if self.successors and count != self.streams:
            raise ValueError(f"a buffer with successors takes one vectorised step ({self.streams} rows) at a time, got {count}")
        if count > self.capacity:  # only the newest `capacity` rows can survive
            rows = {name: value[-self.capacity:] for name, value in rows.items()}
            count = self.capacity
        index = (self.position + torch.arange(count, device=self.device)) % self.capacity
        for name, storage in self.data.items():
            storage[index] = rows[name].to(storage.dtype)
        self.position = (self.position + count) % self.capacity
        self.size = min(self.size + count, self.capacity)
        if self.successors:
            self._add_successors(index, rows)

    def _add_successors(self, index: Tensor, rows: dict[str, Tensor]) -> None:
        self.final_seq[index] = -1
        ends = (rows["terminated"] | rows["truncated"]).bool()
        ended = int(ends.sum())
        if ended:
            self._reserve_finals(ended)
            numbers = self.final_count + torch.arange(ended, device=self.device)
            slots = numbers % self.final_capacity
            for name, table in self.finals.items():
                table[slots] = rows[name][ends].to(table.dtype)
            self.final_seq[index[ends]] = numbers
            self.final_count += ended
        for name, head in self.head.items():
            head.copy_(rows[name])

    def _reserve_finals(self, count: int) -> None:
        """Room for `count` more final observations without overwriting one a stored row refers to."""
        if self.final_count + count - self.oldest_final <= self.final_capacity:
            return
        stored = self.final_seq[: self.size]  # rows [0, size) once cleared or before the ring is full
        referred = stored[stored >= 0]
        self.oldest_final = int(referred.min()) if referred.numel() else self.final_count
        needed = self.final_count + count - self.oldest_final
        if needed <= self.final_capacity:
            return
        capacity = min(max(2 * self.final_capacity, needed, 4 * self.streams), self.capacity + self.streams)
        _check_fits(capacity, _row_bytes(self.next_fields), self.device)
        self._set_finals(capacity, self._live_finals())

    def _live_finals(self) -> dict[str, Tensor]:
        """The final observations rows may still refer to (numbered oldest_final .. final_count - 1), in order."""
        numbers = torch.arange(self.oldest_final, self.final_count, device=self.device)
        return {name: table[numbers % self.final_capacity] for name, table in self.finals.items()}

    def _set_finals(self, capacity: int, live: dict[str, Tensor]) -> None:
        """A side table of `capacity` slots holding `live` (see `_live_finals`; empty when none were kept)."""
        numbers = torch.arange(self.oldest_final, self.final_count, device=self.device)
        self.finals = {name: torch.zeros((capacity, *shape), dtype=dtype, device=self.device)
                       for name, (shape, dtype) in self.next_fields.items()}
        for name, values in live.items():
            self.finals[name][numbers % capacity] = values.to(self.device, self.finals[name].dtype)

    def _gather(self, index: Tensor) -> dict[str, Tensor]:
        """The rows at storage positions `index` (any shape), next fields included."""
        rows = {name: storage[index] for name, storage in self.data.items()}
        if not self.successors:
            return rows
        oldest = self.position if self.size == self.capacity else 0
        logical = (index - oldest) % self.capacity
        number = self.final_seq[index]
        final = number >= 0
        newest = (logical >= self.size - self.streams) & ~final
        stream = (logical - (self.size - self.streams)).clamp(0, self.streams - 1)
        successor = (index + self.streams) % self.capacity
        for name, base in self.successors.items():
            value = self.data[base][successor]
            shape = (*index.shape, *([1] * (value.dim() - index.dim())))
            value = torch.where(newest.view(shape), self.head[name][stream], value)
            if self.finals:
                value = torch.where(final.view(shape), self.finals[name][number.clamp_min(0) % self.final_capacity], value)
            rows[name] = value
        return rows

    def sample(self, batch_size: int) -> dict[str, Tensor]:
        """Rows drawn uniformly with replacement from what is stored."""
        index = torch.randint(self.size, (batch_size,), generator=self.generator, device=self.device)
        return self._gather(index)

    def draw(self, sampler: Sampler, batch_size: int) -> dict[str, Tensor]:
        """One batch of what `sampler` asks for (see `Sampler`)."""
        if sampler.kind == "rollout":
            return self.ordered()
        if sampler.kind == "windows":
            return self.sample_sequences(max(1, batch_size // sampler.length), sampler.length, self.streams,
                                         sampler.episode_aligned)
        return self.sample(batch_size)

    def sample_sequences(self, count: int, length: int, streams: int,
                         episode_aligned: bool = False) -> dict[str, Tensor]:
        """`count` windows of `length` consecutive steps of one sub-environment, time-major: every
        field [length, count, ...], plus "valid" [length, count] bool.

        Rows must have been added `streams` at a time (one vectorised step of `streams`
        sub-environments, as the trainer does), so that, oldest first, the next step of stored row
        i's sub-environment is row i + streams, whatever the capacity. Windows start at a stored
        row drawn uniformly with replacement (with `episode_aligned`, at a stored episode's first
        step: the stored step after an episode end, or one of the first `streams` rows while the
        ring has not wrapped) and never wrap past the newest row (the write head): their steps
        beyond it are not valid (the fields repeat the window's last valid step). Windows may span
        episode boundaries; the done flags tell where.
        """
        if episode_aligned:
            first = self._episode_starts(streams)
            start = first[torch.randint(first.numel(), (count,), generator=self.generator, device=self.device)]
        else:
            start = torch.randint(self.size, (count,), generator=self.generator, device=self.device)
        offsets = streams * torch.arange(length, device=self.device).unsqueeze(1)  # [length, 1]
        logical = start + offsets
        valid = logical < self.size
        last = start + streams * ((self.size - 1 - start) // streams)  # the window's newest stored step
        oldest = self.position if self.size == self.capacity else 0
        index = (oldest + torch.minimum(logical, last)) % self.capacity
        return {**self._gather(index), "valid": valid}

    def _episode_starts(self, streams: int) -> Tensor:
        """Logical indices (0: oldest) of the stored rows that begin an episode; every row when no
        stored row does (an episode longer than the ring)."""
        oldest = self.position if self.size == self.capacity else 0
        logical = torch.arange(self.size, device=self.device)
        before = (oldest + logical - streams) % self.capacity  # the same sub-environment's previous step
        ended = (self.data["terminated"][before] | self.data["truncated"][before]).bool()
        starts = torch.where(logical >= streams, ended, torch.tensor(self.size < self.capacity, device=self.device))
        return logical[starts] if bool(starts.any()) else logical

    def ordered(self) -> dict[str, Tensor]:
        """Every stored row, oldest first (an on-policy rollout in the order it was collected)."""
        start = self.position if self.size == self.capacity else 0
        return self._gather((start + torch.arange(self.size, device=self.device)) % self.capacity)

    def clear(self) -> None:
        """Forget every row (the storage stays allocated)."""
        self.position = self.size = 0
        self.oldest_final = self.final_count

    def memory_bytes(self) -> int:
        tables = [*self.data.values(), *self.head.values(), *self.finals.values(), self.final_seq]
        return sum(t.numel() * t.element_size() for t in tables)

    def state_dict(self, include_data: bool = True, copy: bool = True) -> dict[str, Any]:
        """Position, size and sampling state, and with `include_data` the stored rows. `copy=False`
        (the trainer, which writes the state to disk at once) hands a full CPU buffer's storage
        itself instead of a copy, so a checkpoint does not double the replay's memory; later
        writes then change the state handed out."""
        state: dict[str, Any] = {"position": self.position, "size": self.size,
                                 "generator": self.generator.get_state()}
        if include_data:
            def rows(t: Tensor) -> Tensor:
                whole = self.size == self.capacity and t.device.type == "cpu" and not copy
                return t if whole else t[: self.size].to("cpu", copy=True)

            state["data"] = {name: rows(t) for name, t in self.data.items()}
            if self.successors:
                numbers = self.final_seq[: self.size]
                self.oldest_final = int(numbers[numbers >= 0].min()) if bool((numbers >= 0).any()) else self.final_count
                state["successors"] = {
                    "final_seq": numbers.to("cpu", copy=True), "final_count": self.final_count,
                    "first_final": self.oldest_final, "finals": {k: v.cpu() for k, v in self._live_finals().items()},
                    "head": {name: t.to("cpu", copy=True) for name, t in self.head.items()}}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.finals, self.final_count, self.oldest_final = {}, 0, 0
        if "data" not in state:  # restored without contents: start empty
            self.position = self.size = 0
            return
        self.position, self.size = state["position"], state["size"]
        saved = state["data"]
        missing = set(self.data) - set(saved)
        if missing:
            raise VimarlError(f"the saved replay buffer lacks the fields {sorted(missing)}; resume with "
                              f"save_buffer=false (the replay then refills) or from a checkpoint that has them")
        for name, storage in self.data.items():  # fields saved by an older layout and no longer stored are dropped
            storage[: self.size] = saved[name].to(self.device)
        if not self.successors:
            return
        if "successors" in state:
            kept = state["successors"]
            self.final_seq[: self.size] = kept["final_seq"].to(self.device)
            self.final_count, self.oldest_final = kept["final_count"], kept["first_final"]
            heads = kept["head"]
            finals = kept["finals"]
        else:  # saved with every next field in every row (before successors): keep the episode ends' and the newest
            oldest = self.position if self.size == self.capacity else 0
            order = (oldest + torch.arange(self.size)) % self.capacity
            ends = (saved["terminated"] | saved["truncated"]).bool()[order]
            self.final_seq[order[ends].to(self.device)] = torch.arange(int(ends.sum()), device=self.device)
            self.final_count = int(ends.sum())
            heads = {name: saved[name][order[-self.streams:]] for name in self.successors}
            finals = {name: saved[name][order[ends]] for name in self.successors}
        for name, head in self.head.items():
            head.copy_(heads[name])
        if self.final_count > self.oldest_final:
            self._set_finals(max(self.final_count - self.oldest_final, 4 * self.streams), finals)


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else None
        return pages * os.sysconf("SC_PAGE_SIZE") if pages else None


def _check_fits(capacity: int, row_bytes: int, device: torch.device) -> None:
    """A one-line error instead of an out-of-memory kill when the buffer cannot fit."""
    available = available_memory(device)
    needed = capacity * row_bytes
    if available is not None and needed > 0.8 * available:
        fitting = int(0.5 * available / row_bytes)
        raise VimarlError(f"a replay buffer of {capacity:,} transitions x {row_bytes / 1e3:,.1f} kB = "
                          f"{needed / 1e9:,.1f} GB does not fit in the {available / 1e9:,.1f} GB available on "
                          f"{device}; lower buffer_size (e.g. buffer_size={fitting})")


@dataclass
class Transition:
    """A batch of transitions; dicts are keyed by group, tensors have the batch axis first."""

    obs: dict[str, Tensor]
    graph: dict[str, Graph | None]
    action_mask: dict[str, Tensor | None]
    state: Tensor | None
    action: dict[str, Tensor]
    reward: dict[str, Tensor]
    next_obs: dict[str, Tensor]
    next_graph: dict[str, Graph | None]
    next_action_mask: dict[str, Tensor | None]
    next_state: Tensor | None
    terminated: Tensor
    """[b] float32, 1.0 where s' is terminal (no bootstrapping)."""
    alive: dict[str, Tensor | None] = field(default_factory=dict)
    """[b, N] bool per group whose agents can leave: the agent is in at s (None otherwise)."""
    next_alive: dict[str, Tensor | None] = field(default_factory=dict)
    """[b, N] bool: the agent is still in at s' (False: its own episode ended here)."""
    truncated: Tensor | None = None
    """[b] float32, 1.0 where the episode was cut at s' by a time limit (s' is not terminal, but the
    sub-environment's next transition starts a new episode); what on-policy returns need."""
    valid: Tensor | None = None
    """[T, W] bool for a batch of windows (ReplayBuffer.sample_sequences), where every tensor is
    [T, W, ...]: the step holds a stored transition. None for batches of single transitions."""
    extra: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    """The algorithm's extra replay fields (`Algorithm.replay_fields`), {field: {group: tensor}}."""

    def flatten(self) -> "Transition":
        """A batch of windows [T, W, ...] as T * W transitions, time-major (step t of window w is row t * W + w)."""
        def flat(value):
            if isinstance(value, dict):
                return {key: flat(item) for key, item in value.items()}
            if isinstance(value, Graph):
                return Graph(value.neighbors.flatten(0, 1), value.mask.flatten(0, 1))
            return None if value is None else value.flatten(0, 1)

        return Transition(**{f.name: flat(getattr(self, f.name)) for f in fields(self)})

    def continuing(self, group: str) -> Tensor:
        """[b, N] (or [b, 1] when no agent can leave) 1.0 where agent i's episode goes on after
        the transition: the episode is not terminated and the agent has not left."""
        not_done = (1.0 - self.terminated).unsqueeze(-1)
        next_alive = self.next_alive.get(group)
        return not_done if next_alive is None else not_done * next_alive.float()

    def joint_alive(self, groups) -> Tensor | None:
        """[b, N_total] who is in at s over `groups` in order; None when no agent can leave."""
        if all(self.alive.get(g) is None for g in groups):
            return None
        return torch.cat([self.alive[g] if self.alive.get(g) is not None else torch.ones_like(self.reward[g], dtype=torch.bool)
                          for g in groups], dim=1)


def static_graphs(groups: dict[str, GroupSpec], step: TimeStep) -> dict[str, Graph]:
    """{group: its graph in sub-environment 0 [N, K]} for the groups whose graph is static
    (`GroupSpec.static_graph`), read off a TimeStep of the environment."""
    return {name: Graph(step.groups[name].graph.neighbors[0].long(), step.groups[name].graph.mask[0])
            for name, spec in groups.items() if spec.static_graph and spec.graph_k is not None}


ExtraFields = dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]
"""Extra replay fields an algorithm declares: {field: {group: (per-row shape, dtype)}}."""


class TransitionCodec:
    """Flattens transitions of the given groups into buffer rows and back.

    `extra` declares fields beyond the transition itself (see `ExtraFields`); `encode` then needs
    their values for every step, stored as rows "<group>/extra/<field>". `state_dim` 0 stores no
    global state (for algorithms that do not read it: `Algorithm.reads_state`). The graphs in
    `static_graphs` (groups whose `GroupSpec.static_graph`, as `static_graphs(groups, step)` gives
    them) are kept once, here, and every decoded batch gets them instead of stored rows.
    """

    def __init__(self, groups: dict[str, GroupSpec], state_dim: int, extra: ExtraFields | None = None,
                 static_graphs: dict[str, Graph] | None = None):
        self.groups = groups
        self.state_dim = state_dim
        self.extra = extra or {}
        self.static_graphs = static_graphs or {}
        """{group: Graph [N, K]}: one sub-environment's graph, the same for every row."""

    def fields(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        fields: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"terminated": ((), torch.bool),
                                                                  "truncated": ((), torch.bool)}
        if self.state_dim:
            fields["state"] = fields["next_state"] = ((self.state_dim,), torch.float32)
        for name, spec in self.groups.items():
            n = spec.n_agents
            if spec.discrete:
                fields[f"{name}/action"] = ((n,), torch.int64)
            else:
                fields[f"{name}/action"] = ((n, spec.action_space.dim), torch.float32)
            fields[f"{name}/reward"] = ((n,), torch.float32)
            for prefix in ("", "next_"):
                fields[f"{name}/{prefix}obs"] = ((n, spec.obs_dim), torch.float32)
                if spec.graph_k is not None and name not in self.static_graphs:
                    # int32 halves the storage of large graphs; indices are < 2**31.
                    fields[f"{name}/{prefix}neighbors"] = ((n, spec.graph_k), torch.int32)
                    fields[f"{name}/{prefix}mask"] = ((n, spec.graph_k), torch.bool)
                if spec.has_action_mask:
                    fields[f"{name}/{prefix}action_mask"] = ((n, spec.action_space.n), torch.bool)
                if spec.can_leave:
                    fields[f"{name}/{prefix}alive"] = ((n,), torch.bool)
        for key, by_group in self.extra.items():
            for name, (shape, dtype) in by_group.items():
                fields[f"{name}/extra/{key}"] = (shape, dtype)
        return fields

    def successors(self) -> dict[str, str]:
        """{next field: field}: each s' field repeats its s field one step later except at episode
        ends (what `ReplayBuffer(successors=...)` needs to store it once)."""
        fields = self.fields()
        pairs = {"next_state": "state"} if self.state_dim else {}
        pairs.update({f"{name}/next_{key}": f"{name}/{key}" for name in self.groups
                      for key in ("obs", "neighbors", "mask", "action_mask", "alive") if f"{name}/{key}" in fields})
        return pairs

    def encode(self, step: TimeStep, action: dict[str, Tensor], next_step: TimeStep,
               extra: dict[str, dict[str, Tensor]] | None = None) -> dict[str, Tensor]:
        """Rows for one env step of B sub-environments; s' is the pre-reset final step. `extra`
        holds the values of the declared extra fields, {field: {group: [B, ...]}}."""
        rows = {f"{name}/extra/{key}": (extra or {})[key][name]
                for key, by_group in self.extra.items() for name in by_group}
        final = next_step.final_view()
        rows.update(terminated=next_step.terminated, truncated=next_step.truncated)
        if self.state_dim:
            rows["state"], rows["next_state"] = step.state, final.state
        for name, spec in self.groups.items():
            rows[f"{name}/action"] = action[name]
            rows[f"{name}/reward"] = next_step.groups[name].reward
            for prefix, source in (("", step), ("next_", final)):
                group = source.groups[name]
                rows[f"{name}/{prefix}obs"] = group.obs
                if spec.graph_k is not None and name not in self.static_graphs:
                    rows[f"{name}/{prefix}neighbors"] = group.graph.neighbors
                    rows[f"{name}/{prefix}mask"] = group.graph.mask
                if spec.has_action_mask:
                    rows[f"{name}/{prefix}action_mask"] = group.action_mask
                if spec.can_leave:
                    rows[f"{name}/{prefix}alive"] = group.alive
        return rows

    def decode(self, rows: dict[str, Tensor]) -> Transition:
        lead = rows["terminated"].shape  # [b], or [T, W] for windows

        def graph(name: str, prefix: str) -> Graph | None:
            if self.groups[name].graph_k is None:
                return None
            if name in self.static_graphs:
                static = self.static_graphs[name]
                return Graph(static.neighbors.expand(*lead, -1, -1), static.mask.expand(*lead, -1, -1))
            return Graph(rows[f"{name}/{prefix}neighbors"].long(), rows[f"{name}/{prefix}mask"])

        def per_group(key: str) -> dict[str, Tensor | None]:
            return {name: rows.get(f"{name}/{key}") for name in self.groups}

        return Transition(
            obs=per_group("obs"), graph={n: graph(n, "") for n in self.groups},
            action_mask=per_group("action_mask"), state=rows.get("state"),
            action=per_group("action"), reward=per_group("reward"),
            next_obs=per_group("next_obs"), next_graph={n: graph(n, "next_") for n in self.groups},
            next_action_mask=per_group("next_action_mask"), next_state=rows.get("next_state"),
            terminated=rows["terminated"].float(),
            alive=per_group("alive"), next_alive=per_group("next_alive"), truncated=rows["truncated"].float(),
            valid=rows.get("valid"),
            extra={key: {name: rows[f"{name}/extra/{key}"] for name in by_group}
                   for key, by_group in self.extra.items()},
        )
