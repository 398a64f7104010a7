"""Configuration: dataclasses with a docstring per field, YAML presets, dotted overrides.

A run is resolved from, in increasing priority: the dataclass defaults (the papers' values),
the values an environment name presets (``coop_nav_n30`` sets ``n_agents: 30``),
``configs/envs/<env>.yaml`` (budgets that suit the environment), ``configs/presets/<algo>-<env>.yaml``
(tuned values for that pair, when present), a ``--preset FILE`` (or a preset name such as
``paper``, which finds ``configs/presets/<algo>-paper.yaml``) given by the user, and the
``key=value`` overrides. A preset file has up to three sections: ``train``, ``algo``, ``env``.
Overrides are ``algo.<field>=v``, ``env.<field>=v`` and trainer fields without a prefix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vimarl.errors import VimarlError, did_you_mean
from vimarl.fields import as_dict, build

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class TrainConfig:
    """The trainer's own settings (the same for every algorithm)."""

    total_steps: int = 3000
    """Environment steps to train for, summed over the parallel sub-environments."""
    num_envs: int = 8
    """Sub-environments stepped together (B)."""
    seed: int = 0
    """Seeds the networks, the environments (training and, shifted, evaluation) and the buffer."""
    out: str = ""
    """Run directory; empty means runs/<algo>-<env>-s<seed>."""
    device: str = "cpu"
    """Torch device for environments, networks and the replay buffer (cpu, cuda, cuda:1)."""
    torch_threads: int = 1
    """CPU threads for torch; one is fastest for small models on small machines."""
    reuse_freed_memory: bool = False
    """Opt-in, Linux/glibc: keep freed memory for reuse instead of returning it to the kernel
    (mallopt M_MMAP_MAX=0, no trimming): large CPU updates stop page-faulting every activation
    tensor (1.2-3.5x faster updates at N = 1,225), for 1.3-1.6x more peak memory
    (docs/benchmarks.md, VPP scaling). It changes the malloc of the whole process, for the rest of
    its life, so it is off unless asked for (`reuse_freed_memory=true`), library calls included."""
    warmup_steps: int = 1000
    """Environment steps of uniformly random actions before the policy acts and updates start
    (replay algorithms; on-policy ones act from the start)."""
    update_every: int = 1
    """Environment steps between updates (the update-to-data ratio does not depend on num_envs);
    on-policy algorithms update once per rollout instead."""
    gradient_steps: int = 1
    """Gradient steps per update."""
    batch_size: int = 1024
    """Transitions per gradient step (on-policy algorithms set their minibatches in their config)."""
    buffer_size: int = 1_000_000
    """Replay capacity in transitions (one transition = one step of one sub-environment); on-policy
    algorithms store one rollout of rollout_length x num_envs instead."""
    eval_every: int = 1000
    """Environment steps between evaluations (each one plays the deterministic and the sampled policy)."""
    eval_episodes: int = 10
    """Episodes per periodic evaluation, run in parallel. Their initial states come from a held-out
    stream: evaluation k of every run (any seed, any algorithm) plays the same fresh episodes,
    never those of an earlier evaluation or of training (DESIGN §9.3)."""
    final_eval_episodes: int = 100
    """Episodes of the final evaluation at the end of the run (at least eval_episodes), from a stream of
    their own (DESIGN §9.3: at least 100 for the score a comparison uses); 0 makes the last periodic
    evaluation the final one."""
    reference_policies: bool = True
    """At the end of the run, also play the final evaluation's episodes with uniformly random actions
    and with every scripted controller that drives the env (coop_nav's oracle; traffic's fixed_time
    and max_pressure) and write their returns into summary.json (`reference_returns`, with
    `oracle_fraction` = (run - uniform) / (oracle - uniform) where an oracle exists). Costs about one
    final evaluation per policy, once; sweeps may turn it off."""
    eval_deterministic: bool = True
    """Report the most probable actions as eval_return_mean; false reports the sampled ones there (for
    games where agents with identical inputs agree trivially under argmax, such as grid_coordination).
    Both are logged either way (eval_deterministic_return_mean, eval_sampled_return_mean)."""
    checkpoint_every: int | None = None
    """Environment steps between checkpoints; None (the default): at every evaluation, so a crash or
    a kill loses at most one evaluation interval; 0: one at the end only."""
    keep_checkpoints: int = 2
    """Checkpoints kept in OUT/checkpoints (the newest ones)."""
    save_buffer: bool = False
    """Store the replay buffer in checkpoints; needed for a resume to match an uninterrupted run."""
    tensorboard: bool = True
    """Write TensorBoard event files next to metrics.csv."""
    progress: bool = True
    """Show a progress bar with the latest evaluation return and the ETA."""

    def __post_init__(self):
        at_least = {name: 1 for name in ("total_steps", "num_envs", "torch_threads", "update_every", "gradient_steps",
                                         "batch_size", "buffer_size", "eval_episodes", "keep_checkpoints")}
        at_least |= {name: 0 for name in ("seed", "warmup_steps", "eval_every", "final_eval_episodes", "checkpoint_every")}
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        for name, minimum in at_least.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise VimarlError(f"{name}={value} is out of range: it must be at least {minimum} "
                                  f"(default {defaults[name]})")
        if self.eval_every == 0 and self.final_eval_episodes == 0:
            raise VimarlError("eval_every=0 and final_eval_episodes=0 leave the run without any evaluation; "
                              "set one of them, e.g. final_eval_episodes=100")


# -- presets and overrides -------------------------------------------------------------------
SECTIONS = ("train", "algo", "env")


def load_yaml(path: Path) -> dict[str, Any]:
    """A preset file's sections; a clear error for a missing, malformed or mis-shaped file."""
    try:
        content = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as error:
        raise VimarlError(f"cannot read preset {path}: {error.strerror}; check the path") from None
    except yaml.YAMLError as error:
        line = getattr(getattr(error, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise VimarlError(f"preset {path} is not valid YAML{where}; fix the file") from None
    if not isinstance(content, dict) or set(content) - set(SECTIONS):
        extra = sorted(set(content) - set(SECTIONS)) if isinstance(content, dict) else content
        raise VimarlError(f"preset {path} must contain only the sections {', '.join(SECTIONS)}; "
                          f"found {extra}")
    return content


def merge(base: dict[str, dict], update: dict[str, dict]) -> dict[str, dict]:
    merged = {section: dict(base.get(section) or {}) for section in SECTIONS}
    for section in SECTIONS:
        merged[section].update(update.get(section) or {})
    return merged


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """`['algo.lr=0.001', 'seed=3']` -> {'algo': {'lr': '0.001'}, 'env': {}, 'train': {'seed': '3'}}."""
    parsed: dict[str, dict[str, str]] = {section: {} for section in SECTIONS}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise VimarlError(f"override '{item}' must look like key=value (e.g. algo.lr=0.001)")
        section, dot, field = key.partition(".")
        if dot and section in ("algo", "env"):
            parsed[section][field] = value
        elif dot:
            raise VimarlError(f"override '{key}' has an unknown prefix '{section}'"
                              f"{did_you_mean(section, ('algo', 'env'))}; use algo.<field>, "
                              f"env.<field> or a trainer field without a prefix")
        else:
            parsed["train"][key] = value
    return parsed


def preset_layers(algo: str, env: str) -> list[Path]:
    """The preset files that apply to (algo, env), lowest priority first."""
    candidates = [CONFIG_DIR / "envs" / f"{env}.yaml", CONFIG_DIR / "presets" / f"{algo}-{env}.yaml"]
    return [path for path in candidates if path.exists()]


def find_preset(preset: str | Path, algo: str) -> Path:
    """A preset file path, or a name: `paper` finds configs/presets/<algo>-paper.yaml."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    named = CONFIG_DIR / "presets" / f"{algo}-{preset}.yaml"
    if named.exists():
        return named
    names = sorted(p.stem.removeprefix(f"{algo}-") for p in (CONFIG_DIR / "presets").glob(f"{algo}-*.yaml"))
    raise VimarlError(f"no preset file '{preset}' and no preset named '{preset}' for '{algo}'"
                      f"{did_you_mean(str(preset), names)}; named presets for {algo}: "
                      f"{', '.join(names) or 'none'}")


@dataclass
class RunConfig:
    """Everything that defines a run: written to OUT/config.yaml and read back by --resume."""

    algo: str
    env: str
    train: TrainConfig
    algo_config: Any
    env_config: Any

    def to_dict(self) -> dict[str, Any]:
        return {"algo": self.algo, "env": self.env, "train": as_dict(self.train),
                "algo_config": as_dict(self.algo_config), "env_config": as_dict(self.env_config)}


def resolve(algo: str, env: str, overrides: dict[str, dict[str, Any]] | None = None,
            preset: str | Path | None = None) -> RunConfig:
    """Build a validated RunConfig from presets and overrides (see the module docstring)."""
    from vimarl.algos import get_algorithm
    from vimarl.envs.registry import get_env

    algo_cls = get_algorithm(algo)
    entry = get_env(env)
    env_cls = entry.load()
    values: dict[str, dict] = {section: {} for section in SECTIONS}
    values["env"] = dict(entry.defaults)  # what the env's name presets, e.g. n_agents for coop_nav_n30
    for path in preset_layers(algo, env):
        values = merge(values, load_yaml(path))
    if preset:
        values = merge(values, load_yaml(find_preset(preset, algo)))
    values = merge(values, overrides or {})
    return RunConfig(algo=algo, env=env,
                     train=build(TrainConfig, values["train"], "train"),
                     algo_config=build(algo_cls.Config, values["algo"], "algo"),
                     env_config=build(env_cls.Config, values["env"], "env"))


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Read back a RunConfig written by `RunConfig.to_dict` (OUT/config.yaml)."""
    from vimarl.algos import get_algorithm
    from vimarl.envs.registry import get_env

    try:
        algo_cls = get_algorithm(data["algo"])
        env_cls = get_env(data["env"]).load()
        return RunConfig(algo=data["algo"], env=data["env"],
                         train=build(TrainConfig, data["train"], "train"),
                         algo_config=build(algo_cls.Config, data["algo_config"], "algo"),
                         env_config=build(env_cls.Config, data["env_config"], "env"))
    except (KeyError, TypeError) as error:
        raise VimarlError(f"run config is incomplete (missing {error}); "
                          f"it must be a config.yaml written by vimarl train") from None
