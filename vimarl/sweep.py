"""Experiment suites: one YAML file per paper figure or table (configs/experiments/), expanded into
(algorithm, environment, seed) cells that each run as `vimarl train` in its own subprocess and run
directory OUT/<env>/<label>-s<seed>; a ledger (sweep.json, sweep.csv), a summary over seeds
(summary.md, summary.csv: IQM with its bootstrap interval, vimarl.stats) and one learning-curve
figure per environment at the end.

An experiment file (every key but `envs` and `algorithms` is optional)::

    title: "MA-SAC vs MADDPG"            # what the figure shows
    paper: "003 (MA-SAC)"                # the paper, figure and section the cells mirror
    figure: "Fig. 2, Sec. 5.3"
    metric: eval_return_mean             # the compared column, a run's score its mean over the last 3 evaluations (a list sums columns)
    divide_by: 1                         # e.g. N for a per-agent return
    extra_metrics: {name: column}        # further columns summarised the same way
    random_baseline: false               # add the uniform-random policy's return to the summary
    train: {key: value}                  # trainer overrides for every cell and scale
    scales:
      cpu:   {seeds: [0, 1, 2], train: {...}, envs: [env labels], note: "..."}  # envs: a subset
      paper: {seeds: [0, 1, 2, 3, 4], train: {...}, note: "..."}
    envs:
      label: {env: NAME, overrides: {...}, scales: {cpu: {...}}, metric: ..., divide_by: N,
              algorithms: {algo_label: {algo: ..., preset: ..., overrides: {...}}}}
    algorithms:
      label: {algo: NAME, preset: FILE_OR_NAME or {scale: FILE_OR_NAME}, overrides: {...}, envs: [env labels],
              scales: {cpu: {overrides: {...}}},
              shared: false}             # shared: false = this arm keeps its own paper's values
    shared: {lr: 0.01, gamma: 0.95}      # hyperparameters every arm gets (a paper's one table for all)
    schedules:                           # schedules set relative to each cell's budget
      epsilon_decay_steps: {fraction: 0.3, of: env_steps}   # a duration: 30% of the run's env steps
      md_delay: {fraction: 0.002, of: updates}               # 0.2% of its gradient steps (at least 1)
      epsilon_lr: {per_run: 50, of: updates}                 # a rate: 50 / the run's gradient steps
    claims: [...]                        # see vimarl.report

Overrides are `vimarl train` key=value pairs (algo.<field>, env.<field>, trainer fields); later
layers win: experiment train, scale train, env overrides, env scale overrides, algorithm
overrides, algorithm scale overrides, the env's per-algorithm overrides.

Fair arms (DESIGN §9.1) by construction: `shared` (top level, or per scale) states once what a
comparison's arms share. Every arm gets each field as algo.<field>, every member of a `team` arm
in algo.configs (opponents included), unless the arm sets the field itself (which the report marks
and tests/test_experiments.py refuses) or opts out with `shared: false`; a shared field that an
arm's algorithm lacks is an error. `schedules` (top level, or per scale: typically the cpu scale,
where the papers' step counts would outlast the run) sets every arm's schedule fields that exist
in its algorithm from the cell's own resolved budget: env steps (total_steps) or gradient steps
(`planned_updates`).
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from vimarl.errors import VimarlError, did_you_mean
from vimarl.logging import read_metrics
from vimarl.stats import Estimate, iqm_interval, run_score

EXPERIMENTS_DIR = Path(__file__).parent / "configs" / "experiments"
SCALES = ("cpu", "paper")
LEDGER, LEDGER_CSV, SUMMARY_CSV, SUMMARY_MD = "sweep.json", "sweep.csv", "summary.csv", "summary.md"
SUMMARY_COLUMNS = ["env", "algorithm", "metric", "main", "n_seeds", "iqm", "iqm_lo", "iqm_hi", "mean", "std",
                   "env_steps", "values"]
EXPERIMENT_COPY = "experiment.yaml"
INTERRUPTED = 130
"""Exit status of `vimarl train` stopped by Ctrl-C or SIGTERM after writing a checkpoint."""
QUIET = {"progress": False, "tensorboard": False}
"""Trainer settings every cell gets unless the experiment sets them: no bars or event files."""
TOP_KEYS = {"title", "paper", "figure", "description", "metric", "divide_by", "extra_metrics", "shared", "schedules",
            "random_baseline", "train", "scales", "envs", "algorithms", "claims", "diagnostics", "notes"}
SOCKET_PATH_LIMIT = 40
"""Ray's session directory holds Unix sockets whose paths must stay under 108 bytes; Ray adds up to
about 65 characters to its temp dir (session_<date>_<pid>/sockets/plasma_store), so a longer temp
dir path is replaced by a short one in /tmp."""


# -- the experiment file ----------------------------------------------------------------------
def experiment_names() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def find_experiment(name: str | Path) -> Path:
    """A path to an experiment YAML file, or a name under vimarl/configs/experiments."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise VimarlError(f"experiment file {path} does not exist; pass a path to a YAML file or "
                              f"one of: {', '.join(experiment_names())}")
        return path
    named = EXPERIMENTS_DIR / f"{name}.yaml"
    if named.exists():
        return named
    raise VimarlError(f"unknown experiment '{name}'{did_you_mean(str(name), experiment_names())}; "
                      f"choose one of: {', '.join(experiment_names())}, or pass a path to a YAML file")


def load_experiment(name: str | Path) -> dict[str, Any]:
    path = find_experiment(name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise VimarlError(f"experiment {path} is not valid YAML{where}; fix the file") from None
    if not isinstance(data, dict):
        raise VimarlError(f"experiment {path} must be a mapping with 'envs' and 'algorithms'; fix the file")
    unknown_keys = set(data) - TOP_KEYS
    if unknown_keys:
        key = sorted(unknown_keys)[0]
        raise VimarlError(f"experiment {path} has an unknown key '{key}'{did_you_mean(key, TOP_KEYS)}; "
                          f"allowed: {', '.join(sorted(TOP_KEYS))}")
    for key in ("envs", "algorithms"):
        if not isinstance(data.get(key), dict) or not data[key]:
            raise VimarlError(f"experiment {path} needs a non-empty '{key}' mapping (label: {{...}}); fix the file")
    for key in ("train", "scales"):
        if not isinstance(data.get(key, {}), dict):
            raise VimarlError(f"experiment {path}: '{key}' must be a mapping; fix the file")
    data.setdefault("name", path.stem)
    data["source"] = str(path)
    return data


@dataclass
class Cell:
    """One run of the sweep: `vimarl train ALGO ENV *args` in `run_dir`."""

    env_label: str
    label: str
    seed: int
    algo: str
    env: str
    args: list[str]
    run_dir: str
    total_steps: int | None
    status: str = "pending"
    attempts: int = 0
    wall_s: float = 0.0
    error: str = ""

    @property
    def key(self) -> str:
        return f"{self.env_label}/{self.label}-s{self.seed}"

    @property
    def preset(self) -> str | None:
        """The cell's --preset, if it has one."""
        return self.args[1] if self.args[:1] == ["--preset"] else None

    def resolve(self):
        """The cell's RunConfig exactly as its `vimarl train` resolves it."""
        from vimarl.config import parse_overrides, resolve
        return resolve(self.algo, self.env, parse_overrides(self.args[2:] if self.preset else self.args), self.preset)

    def train_command(self, resume: bool) -> list[str]:
        base = [sys.executable, "-m", "vimarl.cli", "train"]
        if resume:
            steps = [f"total_steps={self.total_steps}"] if self.total_steps is not None else []
            return [*base, "--resume", self.run_dir, *steps, "progress=false"]
        return [*base, self.algo, self.env, *self.args, f"out={self.run_dir}"]


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return str(value)


def _scale_section(spec: dict, scale: str, where: str) -> dict:
    section = (spec.get("scales") or {}).get(scale) or {}
    if not isinstance(section, dict):
        raise VimarlError(f"{where}: scales.{scale} must be a mapping; fix the experiment file")
    return section


def expand(experiment: dict, scale: str = "cpu", out: str | Path = "runs/sweep",
           seeds: list[int] | None = None, only: str | None = None) -> list[Cell]:
    """The experiment's cells at `scale`, with their run directories under `out`."""
    if scale not in SCALES:
        raise VimarlError(f"unknown scale '{scale}'; choose one of: {', '.join(SCALES)}")
    name = experiment.get("name", "experiment")
    scale_spec = _scale_section(experiment, scale, name)
    seeds = list(seeds if seeds is not None else scale_spec.get("seeds", experiment.get("seeds", [0, 1, 2])))
    cells = []
    scale_envs = scale_spec.get("envs")
    unknown = sorted(set(scale_envs or ()) - set(experiment["envs"]))
    if unknown:
        raise VimarlError(f"{name}: scales.{scale}.envs names {', '.join(unknown)}, not in envs; fix the file")
    for env_label, env_spec in experiment["envs"].items():
        if scale_envs is not None and env_label not in scale_envs:
            continue
        env_spec = env_spec or {}
        env_algorithms = env_spec.get("algorithms") or {}
        for label, algo_spec in experiment["algorithms"].items():
            algo_spec = algo_spec or {}
            if "envs" in algo_spec and env_label not in algo_spec["envs"]:
                continue
            per_env = env_algorithms.get(label) or {}
            overrides: dict[str, Any] = dict(QUIET)
            for layer in (experiment.get("train"), scale_spec.get("train"), env_spec.get("overrides"),
                          _scale_section(env_spec, scale, f"{name} env {env_label}").get("overrides"),
                          algo_spec.get("overrides"),
                          _scale_section(algo_spec, scale, f"{name} arm {label}").get("overrides"),
                          per_env.get("overrides")):
                overrides.update(layer or {})
            algo = per_env.get("algo", algo_spec.get("algo", label))
            env = env_spec.get("env", env_label)
            preset = per_env.get("preset", algo_spec.get("preset"))
            if isinstance(preset, dict):  # one preset per scale, e.g. {cpu: cpu, paper: paper}
                preset = preset.get(scale)
            shared = {} if algo_spec.get("shared") is False else {
                **(experiment.get("shared") or {}), **(scale_spec.get("shared") or {})}
            schedules = {**(experiment.get("schedules") or {}), **(scale_spec.get("schedules") or {})}
            overrides = fair_overrides(algo, env, overrides, preset, shared, schedules,
                                       f"{name}: arm {label} on {env_label}")
            for seed in seeds:
                key = f"{env_label}/{label}-s{seed}"
                if only and not fnmatch.fnmatchcase(key, only) and only not in key:
                    continue
                args = [*(["--preset", str(preset)] if preset else []),
                        *(f"{k}={_format(v)}" for k, v in overrides.items()), f"seed={seed}"]
                run_dir = Path(out) / env_label / f"{label}-s{seed}"
                cells.append(Cell(env_label, label, seed, algo, env, args, str(run_dir),
                                  _total_steps(algo, env, overrides, preset)))
    if not cells:
        raise VimarlError(f"experiment {name} has no cells" + (f" matching --only {only}" if only else "")
                          + "; check --only and --seeds")
    return cells


def planned_updates(train) -> int:
    """Gradient steps a replay run of this TrainConfig takes: one update every update_every env steps
    after the warm-up, gradient_steps each."""
    return max(0, train.total_steps - train.warmup_steps) // train.update_every * train.gradient_steps


def _mapping(value: Any) -> dict:
    """A mapping override as written in an experiment file (a YAML string or a mapping)."""
    value = yaml.safe_load(value) if isinstance(value, str) else value
    return dict(value or {})


def schedule_value(rule: dict, train, where: str) -> int | float:
    """A schedule field's value for a run with this TrainConfig (see the module docstring)."""
    unit = rule.get("of")
    if unit not in ("env_steps", "updates") or len(set(rule) & {"fraction", "per_run"}) != 1:
        raise VimarlError(f"{where}: a schedule must be {{fraction: F, of: env_steps|updates}} or "
                          f"{{per_run: K, of: env_steps|updates}}, got {rule}; fix the experiment file")
    count = train.total_steps if unit == "env_steps" else planned_updates(train)
    if "fraction" in rule:
        return max(1, round(float(rule["fraction"]) * count))
    return float(rule["per_run"]) / max(1, count)


def fair_overrides(algo: str, env: str, overrides: dict, preset: str | None, shared: dict, schedules: dict,
                   where: str) -> dict:
    """The cell's overrides with the comparison's shared hyperparameters and budget-relative schedules
    added (a value the arm sets itself stays), for the algorithm or every member of a team."""
    if not shared and not schedules:
        return overrides
    from vimarl.algos import get_algorithm
    from vimarl.config import parse_overrides, resolve

    try:
        train = resolve(algo, env, parse_overrides([f"{k}={_format(v)}" for k, v in overrides.items()]), preset).train
    except VimarlError as error:
        raise VimarlError(f"{where}: {error}") from None

    def added(name: str, own: dict) -> dict:
        fields = {f.name for f in dataclasses.fields(get_algorithm(name).Config)}
        missing = sorted(set(shared) - fields)
        if missing:
            raise VimarlError(f"{where}: shared field(s) {', '.join(missing)} do not exist in {name}'s config; "
                              f"give the arm `shared: false` (its own paper's values) or fix the field names")
        values = dict(shared)
        values.update({field: schedule_value(rule, train, where) for field, rule in schedules.items() if field in fields})
        return {k: v for k, v in values.items() if k not in own}

    overrides = dict(overrides)
    if algo == "team":
        members = _mapping(overrides.get("algo.members"))
        configs = _mapping(overrides.get("algo.configs"))
        for name in dict.fromkeys(members.values()):
            configs[name] = {**added(name, configs.get(name) or {}), **(configs.get(name) or {})}
        overrides["algo.configs"] = configs
        return overrides
    own = {k.removeprefix("algo."): v for k, v in overrides.items() if k.startswith("algo.")}
    overrides.update({f"algo.{k}": v for k, v in added(algo, own).items()})
    return overrides


def _total_steps(algo: str, env: str, overrides: dict, preset: str | None) -> int | None:
    """total_steps as the run will resolve it (None where the cell's config is invalid: it fails when run)."""
    if "total_steps" in overrides and preset is None:
        try:
            return int(overrides["total_steps"])
        except ValueError:
            return None
    from vimarl.config import parse_overrides, resolve
    try:
        return resolve(algo, env, parse_overrides([f"{k}={_format(v)}" for k, v in overrides.items()]),
                       preset).train.total_steps
    except VimarlError:
        return None


# -- running cells ----------------------------------------------------------------------------
def last_env_steps(run_dir: str | Path) -> int:
    rows = read_metrics(Path(run_dir) / "metrics.csv")
    return int(rows[-1]["env_steps"]) if rows else 0


def is_finished(cell: Cell) -> bool:
    """The run's last evaluation reached the cell's total_steps."""
    return cell.total_steps is not None and last_env_steps(cell.run_dir) >= cell.total_steps


def has_checkpoint(run_dir: str | Path) -> bool:
    directory = Path(run_dir) / "checkpoints"
    return directory.is_dir() and any(directory.glob("*.pt"))


def run_cell(cell: Cell, retries: int = 1) -> Cell:
    """Train the cell in a subprocess, resuming from its checkpoint where it has one; retried up to
    `retries` more times. Returns the cell with status done or failed, attempts and wall seconds."""
    run_dir = Path(cell.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                   "VIMARL_PARENT_PID": str(os.getpid())}  # the cell stops (checkpointed) if the sweep dies
    for _ in range(retries + 1):
        cell.attempts += 1
        command = cell.train_command(resume=has_checkpoint(run_dir))
        started = time.perf_counter()
        with open(run_dir / "train.log", "a") as log:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            result = subprocess.run(command, stdout=log, stderr=subprocess.PIPE, text=True, env=environment)
            log.write(result.stderr)
        cell.wall_s += time.perf_counter() - started
        if result.returncode == INTERRUPTED:  # Ctrl-C or SIGTERM: checkpointed, not to be retried now
            cell.status, cell.error = "interrupted", "interrupted; continue with vimarl sweep --resume"
            return cell
        if result.returncode == 0 and (cell.total_steps is None or is_finished(cell)):
            cell.status, cell.error = "done", ""
            return cell
        lines = result.stderr.strip().splitlines()
        cell.error = (lines[-1] if lines else f"exit status {result.returncode}")[:300]
    cell.status = "failed"
    return cell


def _ray_temp_dir(sweep_dir: Path) -> tuple[str, str]:
    """(Ray's temp dir, a note): inside the sweep folder unless its path is too long for Ray's sockets."""
    inside = (sweep_dir / "ray").resolve()
    if len(str(inside)) <= SOCKET_PATH_LIMIT:
        return str(inside), ""
    short = tempfile.mkdtemp(prefix="vimarl-ray-")
    return short, (f"sweep folder path is too long for Ray's Unix sockets ({len(str(inside))} > "
                   f"{SOCKET_PATH_LIMIT} characters); Ray's temp dir is {short}")


def _run_local(cells: list[Cell], workers: int, retries: int, done) -> None:
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        for future in as_completed([pool.submit(run_cell, cell, retries) for cell in cells]):
            done(future.result())
    finally:  # on Ctrl-C: start no more cells; the running ones checkpoint and stop (resume with --resume)
        pool.shutdown(wait=True, cancel_futures=True)


def _run_ray(cells: list[Cell], workers: int, retries: int, done, sweep_dir: Path,
             address: str | None, say) -> None:
    try:
        import ray
    except ImportError:
        raise VimarlError("--backend ray needs Ray: pip install 'vimarl[ray]'") from None
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    fallback = None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        temp_dir, note = _ray_temp_dir(sweep_dir)
        if note:
            say(note)
            fallback = temp_dir
        ray.init(num_cpus=max(1, workers), _temp_dir=temp_dir, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(run_cell)
        pending = {task.remote(cell, retries): cell for cell in cells}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as error:  # the worker died: the cell counts as failed
                cell.status, cell.attempts, cell.error = "failed", cell.attempts + 1, str(error).splitlines()[0][:300]
                result = cell
            done(result)
    finally:
        ray.shutdown()
        if fallback:
            shutil.rmtree(fallback, ignore_errors=True)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor(), else the architecture."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    import torch
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu_name()}, {os.cpu_count()} CPUs{gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def write_ledger(sweep_dir: Path, header: dict, cells: list[Cell]) -> None:
    data = {**header, "cells": [asdict(cell) for cell in cells]}
    tmp = sweep_dir / (LEDGER + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(sweep_dir / LEDGER)
    columns = ["env_label", "label", "seed", "status", "attempts", "wall_s", "total_steps", "run_dir", "error"]
    with open(sweep_dir / LEDGER_CSV, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for cell in cells:
            writer.writerow([round(v, 1) if isinstance(v, float) else v for v in (getattr(cell, c) for c in columns)])


def read_ledger(sweep_dir: str | Path) -> dict:
    """The ledger, each cell's run_dir taken to be SWEEP_DIR/<env>/<label>-s<seed> (where the
    sweep put it), so that a sweep folder that was moved or restored from an archive still reads."""
    path = Path(sweep_dir) / LEDGER
    if not path.exists():
        raise VimarlError(f"{sweep_dir} holds no {LEDGER}; pass the --out folder of a vimarl sweep")
    ledger = json.loads(path.read_text())
    for cell in ledger["cells"]:
        cell["run_dir"] = str(Path(sweep_dir).absolute() / cell["env_label"] / f"{cell['label']}-s{cell['seed']}")
    return ledger


ARCHIVED_RUN_FILES = ("metrics.csv", "config.yaml", "summary.json")
"""What `archive` keeps of a finished run: enough for `vimarl report` and `vimarl sweep --resume`."""


def archive(sweep_dir: str | Path, dest: str | Path) -> int:
    """Copy a sweep's ledger, its experiment file and, for every finished cell, the run files
    that reports and resumption read (no checkpoints, logs or figures: a few KB a run) into
    `dest`, to keep them in git between sessions; returns the number of runs copied. Restore
    with `cp -r DEST runs/sweeps/NAME-SCALE` and continue with `vimarl sweep NAME --resume
    --out runs/sweeps/NAME-SCALE` (finished cells are skipped, the others start afresh)."""
    sweep_dir, dest = Path(sweep_dir), Path(dest)
    ledger = read_ledger(sweep_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for name in (LEDGER, LEDGER_CSV, EXPERIMENT_COPY):
        if (sweep_dir / name).exists():
            shutil.copyfile(sweep_dir / name, dest / name)
    copied = 0
    for cell in ledger["cells"]:
        run = Cell(**cell)
        if not is_finished(run):
            continue
        target = dest / run.env_label / f"{run.label}-s{run.seed}"
        target.mkdir(parents=True, exist_ok=True)
        for name in ARCHIVED_RUN_FILES:
            if (Path(run.run_dir) / name).exists():
                shutil.copyfile(Path(run.run_dir) / name, target / name)
        copied += 1
    return copied


def sweep(experiment_name: str | Path, scale: str = "cpu", backend: str = "local", workers: int = 2,
          resume: bool = False, out: str | Path | None = None, seeds: list[int] | None = None,
          only: str | None = None, retries: int = 1, ray_address: str | None = None,
          command: str = "", say=lambda line: print(line, file=sys.stderr)) -> Path:
    """Run an experiment's cells and write the ledger, summary and figures; returns the sweep folder."""
    if backend not in ("local", "ray"):
        raise VimarlError(f"unknown backend '{backend}'; choose local or ray")
    experiment = load_experiment(experiment_name)
    sweep_dir = Path(out or f"runs/sweeps/{experiment['name']}-{scale}").absolute()  # Ray workers start elsewhere
    cells = expand(experiment, scale, sweep_dir, seeds, only)
    if (sweep_dir / LEDGER).exists() and not resume:
        raise VimarlError(f"{sweep_dir} already holds a sweep; continue it with --resume or choose another --out")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    before = read_ledger(sweep_dir) if resume and (sweep_dir / LEDGER).exists() else {"cells": []}
    previous = {c["env_label"] + "/" + c["label"] + f"-s{c['seed']}": c for c in before["cells"]}
    selected = {cell.key for cell in cells}
    if only and previous:  # --only picks the cells that run now; the ledger keeps the others it holds
        cells = [cell for cell in expand(experiment, scale, sweep_dir, seeds) if cell.key in selected | set(previous)]
    for cell in cells:
        if cell.key in previous:
            cell.attempts, cell.wall_s = previous[cell.key]["attempts"], previous[cell.key]["wall_s"]
        if is_finished(cell):
            cell.status = "done"
    (sweep_dir / EXPERIMENT_COPY).write_text(Path(experiment["source"]).read_text())
    header = {"experiment": experiment["name"], "scale": scale, "backend": backend, "workers": workers,
              "seeds": sorted({c.seed for c in cells}), "command": command or f"vimarl sweep {experiment_name}",
              "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": 0.0}
    todo = [cell for cell in cells if cell.status != "done" and cell.key in selected]
    if "started" in before:  # a resumed sweep keeps its first command and start, and adds up wall time
        header.update(command=before["command"], started=before["started"],
                      resumed=[*before.get("resumed", []), *([header["started"]] if todo else [])])
        if todo:  # cells run on another machine or with other workers: the report names every one
            for key in ("machine", "workers"):
                last = str(before[key]).split(", then ")[-1]
                header[key] = before[key] if last == str(header[key]) else f"{before[key]}, then {header[key]}"
        else:
            header.update(machine=before["machine"], workers=before["workers"])
    say(f"{experiment['name']} ({scale}): {len(cells)} cells, {sum(c.status == 'done' for c in cells)} finished already, "
        f"{len(todo)} to run on {backend} with {workers} workers -> {sweep_dir}")
    write_ledger(sweep_dir, header, cells)
    started = time.perf_counter()
    by_key = {cell.key: i for i, cell in enumerate(cells)}

    def done(result: Cell) -> None:
        cells[by_key[result.key]] = result
        say(f"  {result.key}: {result.status} after {result.attempts} attempt(s), {result.wall_s:.0f} s"
            + (f" ({result.error})" if result.status == "failed" else ""))
        write_ledger(sweep_dir, header, cells)

    if todo:
        if backend == "local":
            _run_local(todo, workers, retries, done)
        else:
            _run_ray(todo, workers, retries, done, sweep_dir, ray_address, say)
    header["wall_s"] = round(before.get("wall_s", 0.0) + time.perf_counter() - started, 1)
    write_ledger(sweep_dir, header, cells)
    failed = [cell.key for cell in cells if cell.status != "done" and cell.key in selected]
    summarise(sweep_dir, experiment, cells)
    say(f"summary in {sweep_dir / SUMMARY_MD}" + (f"; {len(failed)} cell(s) failed: {', '.join(failed)} "
                                                    f"(logs in their train.log; rerun with --resume)" if failed else ""))
    return sweep_dir


# -- summary and figures ----------------------------------------------------------------------
def metric_spec(experiment: dict, env_label: str) -> tuple[list[str], float]:
    """(columns summed into the compared number, divisor) for an environment of the experiment."""
    env_spec = experiment["envs"][env_label] or {}
    metric = env_spec.get("metric", experiment.get("metric", "eval_return_mean"))
    return ([metric] if isinstance(metric, str) else list(metric)), float(env_spec.get("divide_by", experiment.get("divide_by", 1)))


def score(run_dir: str | Path, columns: list[str], divide_by: float = 1.0) -> float | None:
    """The run's score: the sum of `columns` divided by `divide_by`, averaged over its last three
    evaluations (vimarl.stats.run_score; None without metrics)."""
    return run_score(read_metrics(Path(run_dir) / "metrics.csv"), columns, divide_by)


def summary_rows(experiment: dict, cells: list[Cell]) -> list[dict[str, Any]]:
    """Per env x algorithm and metric (the compared one, then the extra metrics): the seeds' scores,
    their IQM with its bootstrap interval, mean and population std."""
    rows = []
    metrics = {"main": None, **(experiment.get("extra_metrics") or {})}
    for env_label in experiment["envs"]:
        columns, divide_by = metric_spec(experiment, env_label)
        for label in dict.fromkeys(c.label for c in cells if c.env_label == env_label):
            runs = [c for c in cells if c.env_label == env_label and c.label == label]
            for name, column in metrics.items():
                used = columns if column is None else ([column] if isinstance(column, str) else list(column))
                values = [v for v in (score(c.run_dir, used, divide_by) for c in runs if c.status == "done")
                          if v is not None]
                if name != "main" and not values:
                    continue
                aggregate = iqm_interval(values) if values else Estimate(math.nan, math.nan, math.nan)
                rows.append({"env": env_label, "algorithm": label, "metric": name if name != "main" else "+".join(used),
                             "main": name == "main", "n_seeds": len(values),
                             "iqm": aggregate.value, "iqm_lo": aggregate.lo, "iqm_hi": aggregate.hi,
                             "mean": statistics.mean(values) if values else math.nan,
                             "std": statistics.pstdev(values) if values else math.nan,
                             "values": values, "env_steps": max((last_env_steps(c.run_dir) for c in runs), default=0)})
    return rows


def random_baseline(experiment: dict, env_label: str, episodes: int = 100) -> float:
    """The compared metric for uniformly random actions on the episodes of every run's final evaluation."""
    from vimarl.algos.base import UniformPolicy
    from vimarl.envs.registry import make_env
    from vimarl.train import FINAL_EVAL_SEED, evaluate

    env_spec = experiment["envs"][env_label] or {}
    options = {k.removeprefix("env."): v for k, v in (env_spec.get("overrides") or {}).items() if k.startswith("env.")}
    env = make_env(env_spec.get("env", env_label), episodes, seed=FINAL_EVAL_SEED, **options)
    env_metrics: dict = {}
    returns = evaluate(UniformPolicy(env.groups), env, seed=FINAL_EVAL_SEED, metrics=env_metrics)
    value = ({"eval_return_mean": returns[next(iter(returns))]} | {f"eval_return/{g}": r for g, r in returns.items()}
             | {f"eval_{name}": metric for name, metric in env_metrics.items()})  # e.g. eval_team_return
    columns, divide_by = metric_spec(experiment, env_label)
    return sum(float(value[c].double().mean()) for c in columns if c in value) / divide_by


def number(value: float, digits: int = 3) -> str:
    """`digits` significant digits, but whole numbers from 10^digits up (returns run to -10^5: no exponents)."""
    return f"{value:,.0f}" if abs(value) >= 10 ** digits else f"{value:.{digits}g}"


def fmt(estimate: Estimate, signed: bool = False) -> str:
    """'value [lo, hi]' (with + on positive numbers if `signed`, for differences), or n/a without finished runs."""
    if math.isnan(estimate.value):
        return "n/a"
    def show(value: float) -> str:
        return ("+" if signed and value >= 0 else "") + number(value)
    return f"{show(estimate.value)} [{show(estimate.lo)}, {show(estimate.hi)}]"


def summarise(sweep_dir: Path, experiment: dict, cells: list[Cell]) -> list[dict[str, Any]]:
    """summary.csv, summary.md and <env>.png figures in the sweep folder; returns the summary rows."""
    from vimarl.plots import matching_columns, plot_matrix, plot_runs

    rows = summary_rows(experiment, cells)
    with open(sweep_dir / SUMMARY_CSV, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(SUMMARY_COLUMNS)
        for r in rows:
            written = {**r, "main": int(r["main"]), "values": " ".join(f"{v:.6g}" for v in r["values"])}
            writer.writerow([written[c] for c in SUMMARY_COLUMNS])
    labels = list(dict.fromkeys(c.label for c in cells))
    baseline = {}
    if experiment.get("random_baseline"):
        for env_label in dict.fromkeys(c.env_label for c in cells):
            try:
                baseline[env_label] = number(random_baseline(experiment, env_label))
            except Exception as error:  # an env that cannot be built here still gets its table row
                baseline[env_label] = f"n/a ({type(error).__name__})"
    lines = [f"# {experiment.get('title', experiment['name'])}", "",
             f"{experiment.get('paper', '')} {experiment.get('figure', '')}".strip()
             + ": IQM [95% bootstrap interval] over seeds of each run's mean over its last three evaluations", ""]
    header = ["env", "metric", *labels] + (["uniform random"] if baseline else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for env_label in dict.fromkeys(c.env_label for c in cells):
        for metric in dict.fromkeys(r["metric"] for r in rows if r["env"] == env_label):
            found = {r["algorithm"]: r for r in rows if r["env"] == env_label and r["metric"] == metric}
            main = any(r["main"] for r in found.values())
            cells_md = [fmt(estimate(found[l])) if l in found else "" for l in labels]
            extra = [baseline.get(env_label, "") if main else ""] if baseline else []
            lines.append("| " + " | ".join([env_label, metric, *cells_md, *extra]) + " |")
    (sweep_dir / SUMMARY_MD).write_text("\n".join(lines) + "\n")
    for env_label in dict.fromkeys(c.env_label for c in cells):
        plotted = [c for c in cells if c.env_label == env_label and c.status == "done"
                   and read_metrics(Path(c.run_dir) / "metrics.csv")]
        if not plotted:
            continue
        columns, _ = metric_spec(experiment, env_label)
        try:
            plot_runs([Path(c.run_dir) for c in plotted], sweep_dir / f"{env_label}.png", columns[0],
                      title=f"{experiment.get('paper', '')} {experiment.get('figure', '')}, {env_label}: "
                      f"{columns[0]}, IQM of {len({c.seed for c in cells})} seeds, 95% band", names=[c.label for c in plotted])
        except VimarlError:
            pass  # a run without the column: the summary says n/a
        for plot in experiment.get("diagnostics") or []:  # e.g. 004's per-agent KL and coordination matrices
            for label in plot.get("algorithms", labels):
                first = next((Path(c.run_dir) for c in cells if c.env_label == env_label and c.label == label
                              and c.status == "done"), None)
                if first is None:
                    continue
                name = sweep_dir / f"{env_label}-{label}-{plot.get('name', 'diagnostic')}.png"
                try:
                    if "matrix" in plot:
                        plot_matrix(first, name, plot["matrix"], f"{env_label}, {label}: {plot['matrix']} at the end")
                    elif matching_columns(first, plot["metric"]):
                        plot_runs([first], name, plot["metric"], title=f"{env_label}, {label}: {plot['metric']}")
                except VimarlError:
                    pass
    return rows


def read_summary(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """summary.csv rows with numbers parsed."""
    path = Path(sweep_dir) / SUMMARY_CSV
    if not path.exists():
        raise VimarlError(f"{sweep_dir} holds no {SUMMARY_CSV}; run vimarl sweep (or --resume it) first")
    numbers = ("iqm", "iqm_lo", "iqm_hi", "mean", "std")
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        if "iqm" not in (reader.fieldnames or []):
            raise VimarlError(f"{path} predates interval estimates; rewrite it with vimarl sweep EXPERIMENT --resume "
                              f"--out {sweep_dir} (finished cells are not run again)")
        return [{**row, "main": row["main"] == "1", "n_seeds": int(row["n_seeds"]), **{c: float(row[c]) for c in numbers},
                 "values": [float(v) for v in row["values"].split()]} for row in reader]


def estimate(row: dict[str, Any]) -> Estimate:
    """A summary row's IQM with its interval."""
    return Estimate(row["iqm"], row["iqm_lo"], row["iqm_hi"])


__all__ = ["Cell", "expand", "load_experiment", "run_cell", "summarise", "sweep"]
