"""The one trainer: collect -> store -> update -> evaluate -> log -> checkpoint (DESIGN §5).

Steps are environment steps summed over the B sub-environments (one vectorised step = B env
steps); agent-steps multiply that by the number of agents. Updates happen every `update_every`
env steps, so the update-to-data ratio does not depend on B.

Evaluation (DESIGN §9.3) runs one episode per sub-environment of a separate environment, playing
both the deterministic and the sampled policy. Its initial states come from a held-out stream:
evaluation k (at env step k * eval_every) resets with `eval_seed(k)`, which depends neither on the
run's seed nor on the algorithm, so every arm and seed of a comparison meets the same fresh
episodes at the same index and no evaluation replays another's or training's. The run ends with a
final evaluation of `final_eval_episodes` episodes from a stream of its own (FINAL_EVAL_SEED), and
(`reference_policies`) the same episodes played by uniformly random actions and by every scripted
controller that drives the env (`reference_returns`), whose returns summary.json states beside the
run's.
Returns are logged per group (`eval_return/<group>`, `train_return/<group>`); `eval_return_mean`
and `train_return_mean` are the first learned group's, the team a comparison tests.
"""

from __future__ import annotations

import ctypes
import json
import math
import signal
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from vimarl import checkpoint
from vimarl.algos import Algorithm, make_algo
from vimarl.algos.base import UniformPolicy
from vimarl.buffer import ReplayBuffer, TransitionCodec, static_graphs
from vimarl.config import RunConfig, TrainConfig, parse_overrides, resolve, run_config_from_dict
from vimarl.envs.base import BatchedEnv, TimeStep
from vimarl.envs.controllers import SCRIPTED_POLICIES, scripted_policy
from vimarl.envs.registry import make_env
from vimarl.errors import NonFiniteError, TrainingInterrupted, VimarlError
from vimarl.logging import MetricsLog

EVAL_SEED_OFFSET = 1_000_003
"""Seed of the first evaluation's episodes; far above any training seed, so evaluations never
replay training episodes."""
EVAL_SEED_STRIDE = 10_007
"""Seed distance between consecutive evaluations: more than any number of sub-environments, so that
environments that seed sub-environment b with seed + b (external simulators) do not share episodes
between evaluations either."""
FINAL_EVAL_SEED = 2_000_000_011
"""Seed of the final evaluation's episodes (below 2**31 for external simulators' seeds)."""
RESUMABLE_CHANGES = {"total_steps", "progress", "tensorboard", "checkpoint_every", "keep_checkpoints",
                     "eval_every", "final_eval_episodes", "reference_policies", "torch_threads", "reuse_freed_memory",
                     "device"}
"""Trainer fields that may change on --resume without breaking exact continuation."""


def eval_seed(index: int) -> int:
    """Seed of evaluation `index` (0 at env step 0): the same for every run, seed and algorithm."""
    return EVAL_SEED_OFFSET + EVAL_SEED_STRIDE * index


def configure_process(config: TrainConfig) -> None:
    if torch.get_num_threads() != config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    if config.reuse_freed_memory:
        reuse_freed_memory()


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; True where it took effect.

    By default glibc serves every allocation above its mmap threshold (at most 32 MiB) with a
    fresh mmap and unmaps it on free, so each large activation tensor is page-faulted and zeroed
    by the kernel again on every update: at N = 1,225 that was 40% of an update's time
    (docs/benchmarks.md). Serving everything from the heap and never trimming it removes that.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: other allocators have their own policies
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    # A trim threshold of -1 becomes SIZE_MAX inside glibc: the heap is never trimmed.
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))


@torch.no_grad()
def evaluate(algo: Algorithm, env: BatchedEnv, seed: int, deterministic: bool = True,
             frames: list | None = None, mode: str | None = None,
             metrics: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Returns of one episode per sub-environment, summed over agents and steps.

    Returns {group: [B]} for the algorithm's groups. Appends env.render() frames when given a list.
    `mode` is one of `algo.evaluation_modes()` (None: the configured execution). Given a dict,
    `metrics` receives the environment's metrics: every [B] float tensor in the `info` of the
    step that ends each sub-environment's episode (e.g. traffic's average_travel_time).
    """
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []), algo.execution(mode):
        torch.manual_seed(seed)  # sampled evaluations are reproducible and leave training's RNG alone
        return _run_episodes(algo, env, seed, deterministic, frames, metrics)


def _run_episodes(algo: Algorithm, env: BatchedEnv, seed: int, deterministic: bool,
                  frames: list | None, metrics: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    was_training = algo.training
    algo.eval()
    step = env.reset(seed=seed)
    if frames is not None:
        frames.append(env.render())
    finished = torch.zeros(env.num_envs, dtype=torch.bool, device=env.device)
    returns = {g: torch.zeros(env.num_envs, device=env.device) for g in algo.groups}
    while not bool(finished.all()):
        step = env.step(act(algo, step, explore=not deterministic))
        if frames is not None:
            frames.append(env.render())
        for g in returns:
            returns[g] += step.groups[g].reward.sum(-1) * ~finished
        if metrics is not None:
            ending = step.done & ~finished
            for key, value in step.info.items():
                if (isinstance(value, Tensor) and value.shape == (env.num_envs,)
                        and value.is_floating_point()):
                    kept = metrics.setdefault(key, torch.full_like(value, math.nan))
                    metrics[key] = torch.where(ending, value, kept)
        finished |= step.done
    algo.train(was_training)
    return returns


def act(algo: Algorithm, step: TimeStep, *, explore: bool) -> dict[str, Tensor]:
    groups = algo.groups
    return algo.act({g: step.groups[g].obs for g in groups}, {g: step.groups[g].graph for g in groups},
                    explore=explore, action_mask={g: step.groups[g].action_mask for g in groups},
                    state=step.state)


def replay_codec(algo: Algorithm, env: BatchedEnv, step: TimeStep) -> TransitionCodec:
    """What the replay stores for `algo`: the global state only if it reads it, static graphs
    once (read off `step`), and the algorithm's extra fields."""
    return TransitionCodec(algo.groups, env.state_dim if algo.reads_state else 0, algo.replay_fields(),
                           static_graphs(algo.groups, step))


def make_replay(algo: Algorithm, env: BatchedEnv, step: TimeStep, capacity: int,
                seed: int) -> tuple[TransitionCodec, ReplayBuffer]:
    """The codec (`replay_codec`) and a buffer of `capacity` rows that stores each of `env`'s
    vectorised steps once (s' from the next row of the same sub-environment)."""
    codec = replay_codec(algo, env, step)
    return codec, ReplayBuffer(capacity, codec.fields(), env.device, seed, successors=codec.successors(),
                               streams=env.num_envs)


def fill_replay(env: BatchedEnv, algo: Algorithm, steps: int, capacity: int | None = None,
                seed: int = 0) -> tuple[TransitionCodec, ReplayBuffer]:
    """A replay buffer filled by `steps` vectorised steps of `algo` exploring in `env` (for
    tests, benchmarks and offline experiments; the Trainer collects the same way)."""
    step = env.reset(seed=seed)
    codec, buffer = make_replay(algo, env, step, capacity or steps * env.num_envs, seed)
    for _ in range(steps):
        actions = act(algo, step, explore=True)
        next_step = env.step(actions)
        algo.observe(step, actions, next_step)
        buffer.add(codec.encode(step, actions, next_step, algo.replay_values(actions)))
        step = next_step
    return codec, buffer


def check_env_step(step: TimeStep, env_name: str, env_steps: int) -> None:
    """NaN / Inf in an environment's observations or rewards: one fused reduction per step (a sum
    that is finite exactly when every term is) and one host sync; the culprit is only looked for
    once something is wrong. Cost: benchmarks/finite_check.py (docs/benchmarks.md)."""
    values = [t for g in step.groups.values() for t in (g.obs, g.reward)]
    if bool(torch.isfinite(torch.stack([v.float().sum() for v in values]).sum())):
        return
    for name, group in step.groups.items():
        for field_name, value in (("observation", group.obs), ("reward", group.reward)):
            bad = ~torch.isfinite(value)
            if bool(bad.any()):
                env_index, agent = (int(i) for i in bad.nonzero()[0][:2])
                raise NonFiniteError(f"env {env_name} returned a non-finite {field_name} for agent {agent} of "
                                     f"group '{name}' (sub-environment {env_index}) at env step {env_steps}; "
                                     f"the environment, not the learner, produced it")


class Trainer:
    """Runs one (algorithm, environment, seed) to `total_steps`; see the module docstring."""

    def __init__(self, run: RunConfig, run_dir: Path):
        self.run, self.config = run, run.train
        self.run_dir = Path(run_dir)
        configure_process(self.config)
        torch.manual_seed(self.config.seed)
        device = self.config.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise VimarlError(f"device={device} but this torch build sees no GPU; use device=cpu or "
                              f"install a CUDA build (make run TORCH=...)")
        self.env = make_env(run.env, self.config.num_envs, self.config.seed, device, config=run.env_config)
        self.eval_env = make_env(run.env, self.config.eval_episodes, eval_seed(0), device, config=run.env_config)
        self.algo = make_algo(run.algo, self.env, config=run.algo_config, device=device)
        self.step = self.env.reset(seed=self.config.seed)
        self.sampler = self.algo.sampler
        self.on_policy = self.sampler.kind == "rollout"  # the buffer then holds exactly one rollout
        capacity = self.sampler.length * self.config.num_envs if self.on_policy else self.config.buffer_size
        self.codec, self.buffer = make_replay(self.algo, self.env, self.step, capacity, self.config.seed)
        self.random_actions = torch.Generator(device=device)
        self.random_actions.manual_seed(self.config.seed + 1)
        self.env_steps = self.updates = 0
        self.wall_s = 0.0
        self.episode_returns = torch.zeros(len(self.algo.groups), self.config.num_envs, device=device)
        self.finished_returns: list[Tensor] = []
        self.metric_sums: dict[str, Tensor] = {}
        self.metric_count = 0
        self.last_eval: tuple[float, float] | None = None
        self.final_eval_env: BatchedEnv | None = None
        self.refill_until = 0
        """Transitions the buffer must hold before updates resume (after a resume without the replay)."""

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> Path:
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.run.to_dict(), sort_keys=False))
        log = MetricsLog(self.run_dir / "metrics.csv",
                         self.run_dir / "tensorboard" if config.tensorboard else None,
                         purge_step=self.env_steps or None)
        if self.env_steps:  # resuming: keep the rows up to the checkpoint
            log.keep_until(self.env_steps)
        # A fresh start (even in a folder a killed run left without a checkpoint) logs from row 0 anew.
        progress = _progress_bar(config, self.env_steps)
        started = time.perf_counter() - self.wall_s
        last_row = (self.env_steps, self.wall_s)
        stop = _StopRequest()
        try:
            if self.env_steps == 0:
                last_row = self._evaluate_and_log(log, progress, started, last_row)
            while self.env_steps < config.total_steps and not stop.requested:
                before = self.env_steps
                self._collect()
                self._learn(before)
                self.wall_s = time.perf_counter() - started
                if _crossed(before, self.env_steps, config.eval_every) or self.env_steps >= config.total_steps:
                    final = self.env_steps >= config.total_steps and config.final_eval_episodes > 0
                    last_row = self._evaluate_and_log(log, progress, started, last_row, final)
                every = config.eval_every if config.checkpoint_every is None else config.checkpoint_every
                if every and _crossed(before, self.env_steps, every) and self.env_steps < config.total_steps:
                    self.save_checkpoint()
                progress.update(self.env_steps - before)
        except VimarlError as error:  # e.g. NonFiniteError; the last good checkpoint stays as it is
            self._write_summary({"status": "failed", "error": str(error)})
            raise
        except Exception as error:
            # A crash mid-iteration may leave the networks half-updated, so nothing is saved now: the
            # last consistent state is the checkpoint of the last evaluation (checkpoint_every=None).
            (self.run_dir / "crash.log").write_text(traceback.format_exc())
            kept = checkpoint.list_checkpoints(self.run_dir / "checkpoints")
            message = (f"training crashed at env step {self.env_steps} ({type(error).__name__}: "
                       f"{str(error).splitlines()[0][:160] if str(error) else 'no message'}); traceback in "
                       f"{self.run_dir / 'crash.log'}; " + (f"continue from step {checkpoint.step_of(kept[-1])} with: "
                                                           f"vimarl train --resume {self.run_dir}" if kept else
                                                           "no checkpoint was written yet"))
            self._write_summary({"status": "failed", "error": message})
            raise VimarlError(message) from error
        finally:
            stop.restore()
            progress.close()
            log.close()
        self.wall_s = time.perf_counter() - started
        self.save_checkpoint()
        if stop.requested:
            raise TrainingInterrupted(f"interrupted at {self.env_steps} env steps; checkpoint saved, "
                                      f"continue with: vimarl train --resume {self.run_dir}")
        self._finish()
        return self.run_dir

    def _collect(self) -> None:
        """One vectorised env step: B transitions into the buffer."""
        config = self.config
        if self.env_steps < config.warmup_steps and not self.on_policy:
            actions = {g: spec.action_space.sample(
                (self.env.num_envs, spec.n_agents), self.random_actions, self.env.device,
                self.step.groups[g].action_mask) for g, spec in self.algo.groups.items()}
        else:
            actions = act(self.algo, self.step, explore=True)
        next_step = self.env.step(actions)
        check_env_step(next_step, self.run.env, self.env_steps)
        self.algo.observe(self.step, actions, next_step)
        self.buffer.add(self.codec.encode(self.step, actions, next_step, self.algo.replay_values(actions)))
        self.episode_returns += torch.stack([next_step.groups[g].reward.sum(-1) for g in self.algo.groups])
        if bool(next_step.done.any()):  # [groups, finished episodes]
            self.finished_returns.append(self.episode_returns[:, next_step.done])
            self.episode_returns = self.episode_returns.masked_fill(next_step.done, 0.0)
        self.step = next_step
        self.env_steps += self.env.num_envs

    def _learn(self, before: int) -> None:
        """The updates due after the env steps since `before`, each on what the algorithm's sampler
        draws: one per full rollout (then a fresh rollout) on-policy, else `gradient_steps` every
        `update_every` env steps after the warm-up."""
        config = self.config
        if self.on_policy:
            updates = int(len(self.buffer) == self.buffer.capacity)
        elif self.env_steps <= config.warmup_steps or len(self.buffer) < max(self.refill_until, 1):
            updates = 0
        else:
            due = self.env_steps // config.update_every - max(before, config.warmup_steps) // config.update_every
            updates = due * config.gradient_steps
        for _ in range(updates):
            self._record(self.algo.update(self.codec.decode(self.buffer.draw(self.sampler, config.batch_size))))
        if self.on_policy and updates:
            self.buffer.clear()

    def _check_finite(self, metrics: dict[str, Tensor]) -> None:
        """Losses and gradient norms of one update (one host sync): NaN / Inf stops the run."""
        watched = {k: v for k, v in metrics.items() if k.startswith(("loss", "grad_norm")) and isinstance(v, Tensor)}
        if not watched or bool(torch.isfinite(torch.stack([v.detach().float().sum() for v in watched.values()]).sum())):
            return
        name, value = next((k, v) for k, v in watched.items() if not bool(torch.isfinite(v).all()))
        raise NonFiniteError(f"{name} became {float(value.float().sum())} in update {self.updates + 1} at env step "
                             f"{self.env_steps} ({self.run.algo} on {self.run.env}); the last good checkpoint is kept. "
                             f"Lower the learning rate or clip the gradients")

    def _check_parameters(self) -> None:
        """Every parameter finite (at each evaluation: one pass over the weights)."""
        for name, parameter in self.algo.named_parameters():
            if not bool(torch.isfinite(parameter).all()):
                raise NonFiniteError(f"parameter {name} of {self.run.algo} became non-finite by env step {self.env_steps} "
                                     f"on {self.run.env}; the last good checkpoint is kept. Lower the learning rate "
                                     f"or clip the gradients")

    def _record(self, metrics: dict[str, Tensor]) -> None:
        self._check_finite(metrics)
        for key, value in metrics.items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + value
        self.metric_count += 1
        self.updates += 1

    @property
    def final_eval_episodes(self) -> int:
        """Episodes of the final evaluation: final_eval_episodes, and never fewer than a periodic one."""
        return max(self.config.final_eval_episodes, self.config.eval_episodes)

    def _evaluation_env(self, final: bool) -> tuple[BatchedEnv, int]:
        """(environment, seed) of the next evaluation: the periodic one at index env_steps // eval_every,
        or the final one (built once, with final_eval_episodes sub-environments)."""
        if not final:
            return self.eval_env, eval_seed(self.env_steps // self.config.eval_every)
        if self.final_eval_env is None:
            self.final_eval_env = make_env(self.run.env, self.final_eval_episodes, FINAL_EVAL_SEED,
                                           self.env.device, config=self.run.env_config)
        return self.final_eval_env, FINAL_EVAL_SEED

    def _evaluate_and_log(self, log: MetricsLog, progress, started: float, last_row: tuple[int, float],
                          final: bool = False):
        self._check_parameters()
        env, seed = self._evaluation_env(final)
        env_metrics: dict[str, Tensor] = {}  # those of the reported policy, like eval_return_mean
        deterministic = self.config.eval_deterministic
        policies = {"deterministic": evaluate(self.algo, env, seed, True,
                                              metrics=env_metrics if deterministic else None),
                    "sampled": evaluate(self.algo, env, seed, False, metrics=None if deterministic else env_metrics)}
        returns = policies["deterministic" if deterministic else "sampled"]
        main = _first_group(returns)
        self.wall_s = time.perf_counter() - started
        steps_since, seconds_since = self.env_steps - last_row[0], self.wall_s - last_row[1]
        row: dict[str, Any] = {
            "env_steps": self.env_steps, "agent_steps": self.env_steps * self.env.n_agents,
            "updates": self.updates, "wall_s": round(self.wall_s, 3),
            "env_steps_per_s": round(steps_since / seconds_since, 1) if steps_since else math.nan,
            "eval_episodes": env.num_envs, "final_eval": int(final),
            "eval_return_mean": main.mean().item(), "eval_return_std": main.std(unbiased=False).item(),
        }
        row.update({f"eval_{name}_return_mean": _first_group(r).mean().item() for name, r in policies.items()})
        row.update({f"eval_return/{g}": r.double().mean().item() for g, r in returns.items()})
        row.update({f"eval_{k}": v.double().mean().item() for k, v in env_metrics.items()})
        for label, mode in self.algo.evaluation_modes().items():
            other = evaluate(self.algo, env, seed, self.config.eval_deterministic, mode=mode)
            row[f"eval_return_mean/{label}"] = _first_group(other).mean().item()
        finished = torch.cat(self.finished_returns, dim=1) if self.finished_returns else None
        for index, g in enumerate(self.algo.groups):
            row[f"train_return/{g}"] = finished[index].mean().item() if finished is not None else math.nan
        row["train_return_mean"] = row[f"train_return/{next(iter(self.algo.groups))}"]
        row.update({k: (v / self.metric_count).item() for k, v in self.metric_sums.items()})
        self.finished_returns, self.metric_sums, self.metric_count = [], {}, 0
        log.append(row)
        self.last_eval = (row["eval_return_mean"], row["eval_return_std"])
        progress.set_postfix(eval_return=f"{row['eval_return_mean']:.3g}", refresh=False)
        return self.env_steps, self.wall_s

    def _finish(self) -> None:
        from vimarl.plots import plot_runs

        plot_runs([self.run_dir], self.run_dir / "curve.png", title=f"{self.run.algo} on {self.run.env}")
        mean, std = self.last_eval if self.last_eval else (math.nan, math.nan)
        summary = {
            "status": "done", "agent_steps": self.env_steps * self.env.n_agents,
            "updates": self.updates, "wall_s": round(self.wall_s, 3),
            "env_steps_per_s": round(self.env_steps / self.wall_s, 1) if self.wall_s else math.nan,
            "eval_return_mean": mean, "eval_return_std": std,
            "eval_episodes": self.final_eval_episodes if self.config.final_eval_episodes else self.config.eval_episodes,
        }
        if self.config.reference_policies:
            env, seed = self._evaluation_env(final=self.config.final_eval_episodes > 0)
            references = reference_returns(env, seed, next(iter(self.algo.groups)))
            summary["reference_returns"] = {name: value for name, (value, _) in references.items()}
            metrics = {name: found for name, (_, found) in references.items() if found}
            if metrics:
                summary["reference_metrics"] = metrics
            if "oracle" in references:
                summary["oracle_fraction"] = oracle_fraction(mean, summary["reference_returns"])
        self._write_summary(summary)

    def _write_summary(self, summary: dict[str, Any]) -> None:
        head = {"algo": self.run.algo, "env": self.run.env, "seed": self.config.seed, "env_steps": self.env_steps}
        (self.run_dir / "summary.json").write_text(json.dumps({**head, **summary}, indent=2) + "\n")

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        directory = self.run_dir / "checkpoints"
        directory.mkdir(parents=True, exist_ok=True)
        path = checkpoint.checkpoint_path(directory, self.env_steps)
        checkpoint.save(path, {
            "run": self.run.to_dict(),
            "algo": self.algo.state_dict(),
            "env": self.env.state_dict(),
            "step": self.step,
            "buffer": self.buffer.state_dict(include_data=self.config.save_buffer, copy=False),
            "counters": {"env_steps": self.env_steps, "updates": self.updates, "wall_s": self.wall_s},
            "episode_returns": self.episode_returns,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "random_actions": self.random_actions.get_state()},
            "last_eval": self.last_eval,
        })
        for old in checkpoint.list_checkpoints(directory)[:-self.config.keep_checkpoints]:
            old.unlink()
        return path

    def load_checkpoint(self, content: dict[str, Any]) -> None:
        device = self.env.device
        self.algo.load_state_dict(content["algo"])
        self.env.load_state_dict(content["env"])
        self.step = _to_device(content["step"], device)
        self.buffer.load_state_dict(content["buffer"])
        if "data" not in content["buffer"] and not self.on_policy:
            # Without the saved replay the buffer restarts empty: hold updates until it again holds
            # a warm-up's worth (at least a batch) instead of drawing whole batches from a few rows.
            self.refill_until = min(self.buffer.capacity, max(self.config.batch_size, self.config.warmup_steps))
            warnings.warn(f"resuming {self.run_dir} without its replay buffer (save_buffer=false): updates wait "
                          f"until it holds {self.refill_until} transitions again, so this run no longer matches "
                          f"an uninterrupted one", stacklevel=2)
        counters = content["counters"]
        self.env_steps, self.updates, self.wall_s = counters["env_steps"], counters["updates"], counters["wall_s"]
        returns = content["episode_returns"].to(device)
        if returns.dim() == 1:  # checkpoints before per-group returns kept the sum over groups
            returns = torch.cat([returns[None], returns.new_zeros(len(self.algo.groups) - 1, returns.numel())])
        self.episode_returns = returns
        rng = content["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.random_actions.set_state(rng["random_actions"])
        self.last_eval = content.get("last_eval")


def reference_returns(env: BatchedEnv, seed: int, group: str) -> dict[str, tuple[float, dict[str, float]]]:
    """{policy: (mean return of `group`, mean env metrics)} of the reference policies on the
    episodes `env` plays from `seed`: "uniform" (uniformly random actions,
    `UniformPolicy(env.groups, seed)`, as `vimarl eval --policy uniform`) and every scripted
    controller of `SCRIPTED_POLICIES` whose `check` accepts the env (e.g. "oracle" on coop_nav,
    "fixed_time" and "max_pressure" on traffic), each played deterministically."""
    uniform = UniformPolicy(env.groups, seed)
    if env.device.type != "cpu":  # its CPU generator cannot draw on another device
        uniform.generator = torch.Generator(device=env.device).manual_seed(seed)
    policies: dict[str, Any] = {"uniform": uniform}
    for name in SCRIPTED_POLICIES:
        try:
            policies[name] = scripted_policy(name, env).to(env.device)
        except VimarlError:  # a controller of another env family
            continue
    results = {}
    for name, policy in policies.items():
        metrics: dict[str, Tensor] = {}
        returns = evaluate(policy, env, seed, metrics=metrics)
        results[name] = (returns[group].cpu().double().mean().item(),
                         {k: v.double().mean().item() for k, v in metrics.items()})
    return results


def oracle_fraction(run_return: float, references: dict[str, float]) -> float:
    """(run - uniform) / (oracle - uniform): the share of the way from uniformly random actions to
    the oracle that the run covers (1 = as good as the oracle; NaN when the two coincide)."""
    gap = references["oracle"] - references["uniform"]
    return (run_return - references["uniform"]) / gap if gap else math.nan


def _first_group(returns: dict[str, Tensor]) -> Tensor:
    """The first group's episode returns, in double precision on the CPU (every logged mean is)."""
    return next(iter(returns.values())).cpu().double()


def _crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]."""
    return every > 0 and after // every > before // every


class _StopRequest:
    """Turns Ctrl-C / SIGTERM into a request honoured between two loop iterations, so the
    checkpoint written on the way out is a consistent state that resumes exactly."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers need the main thread
            self.previous = {s: signal.signal(s, self._request) for s in self.SIGNALS}

    def _request(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _to_device(value, device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if hasattr(value, "__dataclass_fields__"):
        return type(value)(**{k: _to_device(getattr(value, k), device) for k in value.__dataclass_fields__})
    return value


def _progress_bar(config: TrainConfig, initial: int):
    from tqdm import tqdm

    return tqdm(total=config.total_steps, initial=initial, unit="step", dynamic_ncols=True,
                disable=not config.progress, mininterval=0.5, smoothing=0.05)


# -- entry points ------------------------------------------------------------------------------
def train(algo: str | None = None, env: str | None = None, *, resume: str | Path | None = None,
          preset: str | Path | None = None, algo_config: dict | None = None,
          env_config: dict | None = None, **train_overrides: Any) -> Path:
    """Train `algo` on `env` and return the run directory (what `vimarl train` calls).

    Trainer fields are keyword arguments (total_steps=..., seed=..., out=...); hyperparameters
    and scenario settings go in `algo_config` / `env_config` dicts. With `resume=RUN_DIR` the run
    continues from its newest checkpoint; only fields in RESUMABLE_CHANGES may be overridden.
    """
    overrides = {"train": train_overrides, "algo": algo_config or {}, "env": env_config or {}}
    if resume is not None:
        return _resume(Path(resume), overrides)
    if algo is None or env is None:
        raise VimarlError("train needs an algorithm and an environment (e.g. vimarl train vpp "
                          "grid_coordination), or --resume RUN_DIR")
    run = resolve(algo, env, overrides, preset)
    run_dir = Path(run.train.out or f"runs/{algo}-{env}-s{run.train.seed}")
    if checkpoint.list_checkpoints(run_dir / "checkpoints"):
        raise VimarlError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or "
                          f"choose another out=DIR")
    run.train.out = str(run_dir)
    return Trainer(run, run_dir).train()


def train_from_cli(algo: str | None, env: str | None, items: list[str], resume: str | None,
                   preset: str | None) -> Path:
    overrides = parse_overrides(items)
    return train(algo, env, resume=resume, preset=preset, algo_config=overrides["algo"],
                 env_config=overrides["env"], **overrides["train"])


def _resume(run_dir: Path, overrides: dict[str, dict]) -> Path:
    changed = set(overrides["algo"]) | set(overrides["env"]) | (set(overrides["train"]) - RESUMABLE_CHANGES)
    if changed:
        raise VimarlError(f"cannot change {sorted(changed)} when resuming (it would not continue the "
                          f"same run); allowed: {', '.join(sorted(RESUMABLE_CHANGES))}")
    path, content = checkpoint.load_latest(run_dir)
    saved = content["run"]
    saved["train"] = {**saved["train"], **overrides["train"]}
    run = run_config_from_dict(saved)
    done = content["counters"]["env_steps"]
    if run.train.total_steps <= done:
        raise VimarlError(f"{run_dir} has already run {done} env steps, which reaches total_steps="
                          f"{run.train.total_steps}; resume with a larger one, e.g. total_steps={2 * done}")
    run_dir = run_dir.parent.parent if run_dir.is_file() else run_dir  # OUT/checkpoints/step_*.pt
    run.train.out = str(run_dir)
    trainer = Trainer(run, run_dir)
    trainer.load_checkpoint(content)
    return trainer.train()




__all__ = ["Trainer", "evaluate", "fill_replay", "oracle_fraction", "reference_returns", "train"]
