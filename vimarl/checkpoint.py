"""Checkpoint files: atomic (write to a temporary file, fsync, rename, fsync the folder) and safe
to load from anyone (`torch.load(weights_only=True)`: tensors, numbers, strings and plain
containers only, so a file can never run code).

What a trainer saves that is not plain is made plain first (`to_plain`): the dataclasses of a
time step (TimeStep, GroupStep, Graph) become tagged dicts and numpy arrays (numpy's RNG state)
become tensors; `from_plain` rebuilds them, and only these types. A file that holds anything else,
which includes every checkpoint written before format version 2, is refused with a one-line error;
`python -m vimarl.checkpoint upgrade FILE...` rewrites files you trust in the safe format.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vimarl.algos import Algorithm, make_algo
from vimarl.config import RunConfig, run_config_from_dict
from vimarl.envs.base import GroupStep, TimeStep
from vimarl.envs.graph import Graph
from vimarl.envs.registry import make_env
from vimarl.errors import VimarlError

FORMAT = "vimarl-checkpoint"
VERSION = 2
"""2: weights-only (plain) content; 1: pickled TimeStep and numpy objects (upgrade them)."""
_NAME = re.compile(r"step_(\d+)\.pt$")
_DATACLASSES = {cls.__name__: cls for cls in (TimeStep, GroupStep, Graph)}
"""The only non-plain types a checkpoint may describe, rebuilt by `from_plain`."""
_TAG = "__vimarl_type__"


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temporary sibling of `path`, then move it into place durably."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def to_plain(value: Any, where: str = "checkpoint") -> Any:
    """`value` with the allowed dataclasses as tagged dicts and numpy arrays as tensors; a one-line
    VimarlError naming the place of anything else that is not a tensor, number, string or container."""
    if isinstance(value, (torch.Tensor, str, int, float, bool, type(None))):
        return value
    if isinstance(value, dict):
        return {key: to_plain(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(item, f"{where}[{i}]") for i, item in enumerate(value))
    if isinstance(value, np.ndarray):
        return {_TAG: "ndarray", "dtype": str(value.dtype), "data": torch.from_numpy(value.astype(np.int64)
                                                                                    if value.dtype.kind == "u" else value.copy())}
    if isinstance(value, np.generic):
        return value.item()
    if dataclasses.is_dataclass(value) and type(value).__name__ in _DATACLASSES:
        return {_TAG: type(value).__name__,
                **{f.name: to_plain(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}}
    raise VimarlError(f"cannot write {type(value).__name__} at {where} into a checkpoint (only tensors, numbers, "
                      f"strings, containers and {', '.join(_DATACLASSES)}); return plain values from state_dict")


def from_plain(value: Any) -> Any:
    """The inverse of `to_plain`: tagged dicts back into their dataclasses and numpy arrays."""
    if isinstance(value, dict):
        kind = value.get(_TAG)
        if kind == "ndarray":
            return value["data"].numpy().astype(value["dtype"])
        items = {key: from_plain(item) for key, item in value.items() if key != _TAG}
        return _DATACLASSES[kind](**items) if kind in _DATACLASSES else items
    if isinstance(value, (list, tuple)):
        return type(value)(from_plain(item) for item in value)
    return value


def save(path: Path, content: dict[str, Any]) -> None:
    plain = to_plain({"format": FORMAT, "version": VERSION, **content})
    atomic_write(path, lambda file: torch.save(plain, file))


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's content, or a one-line VimarlError if it is missing, damaged, or holds
    anything but plain values (it is never unpickled beyond tensors and containers)."""
    path = Path(path)
    if not path.is_file():
        raise VimarlError(f"checkpoint {path} does not exist; pass a run directory or a .pt file "
                          f"written by vimarl train")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" in str(error).lower():
            found = re.search(r"GLOBAL (\S+)", str(error))
            raise VimarlError(
                f"checkpoint {path} holds a pickled object ({found.group(1) if found else 'not a tensor'}) and was "
                f"not loaded: vimarl loads weights only. Checkpoints of vimarl before format {VERSION} do too; "
                f"if you trust this file, run `python -m vimarl.checkpoint upgrade {path}`") from None
        raise _corrupt(path, error) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as error:
        raise _corrupt(path, error) from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise VimarlError(f"{path} is not a vimarl checkpoint; pass one from OUT/checkpoints/")
    if content.get("version") != VERSION:
        raise VimarlError(f"checkpoint {path} has format version {content.get('version')}, this "
                          f"vimarl reads version {VERSION}; use the vimarl that wrote it")
    return from_plain(content)


def _corrupt(path: Path, error: Exception) -> VimarlError:
    reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
    return VimarlError(f"checkpoint {path} is corrupt or not a vimarl checkpoint ({reason}); "
                       f"delete it to fall back to an earlier one, or retrain")


def upgrade(path: Path) -> None:
    """Rewrite a format-1 checkpoint you trust in the safe format. This unpickles the file with
    `weights_only=False`, which runs whatever code it carries: only for files you made yourself."""
    content = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise VimarlError(f"{path} is not a vimarl checkpoint")
    save(Path(path), {k: v for k, v in content.items() if k not in ("format", "version")})


def load_latest(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]]:
    """(path, content) of the newest readable checkpoint of a run directory (or of a .pt file):
    a corrupt newest one (a kill while the disk was full, a truncated copy) falls back to the one
    kept before it, with a warning; refused (unsafe) files are never skipped over."""
    newest = latest(run_dir)  # a one-line error when there is none
    candidates = [newest] if newest == Path(run_dir) else list(reversed(list_checkpoints(Path(run_dir) / "checkpoints")))
    for path, earlier in zip(candidates, candidates[1:]):
        try:
            return path, load(path, map_location)
        except VimarlError as error:
            if "is corrupt" not in str(error):
                raise
            warnings.warn(f"{error}; using the earlier checkpoint {earlier.name}", stacklevel=2)
    return candidates[-1], load(candidates[-1], map_location)


def load_trained(path: str | Path, device: str = "cpu") -> tuple[RunConfig, Algorithm, dict[str, Any]]:
    """(run config, algorithm with trained weights, checkpoint) from a run directory or .pt file:
    what `vimarl eval`, the reference policies of a report and frozen team members load."""
    _, content = load_latest(Path(path), map_location=device)
    run = run_config_from_dict(content["run"])
    env = make_env(run.env, 1, 0, device, config=run.env_config)
    algo = make_algo(run.algo, env, config=run.algo_config, device=device)
    try:
        algo.load_state_dict(content["algo"])
    except (RuntimeError, KeyError) as error:
        raise VimarlError(f"checkpoint of {path} does not fit {run.algo} with its saved config "
                          f"({str(error).splitlines()[0][:100]}); was it written by another vimarl version?") from None
    return run, algo, content


def step_of(path: Path) -> int:
    match = _NAME.search(Path(path).name)
    return int(match.group(1)) if match else -1


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in `directory`, oldest first."""
    if not Path(directory).is_dir():
        return []
    return sorted((p for p in Path(directory).iterdir() if _NAME.search(p.name)), key=step_of)


def checkpoint_path(directory: Path, env_steps: int) -> Path:
    return Path(directory) / f"step_{env_steps:012d}.pt"


def latest(run_dir: Path) -> Path:
    """The newest checkpoint of a run directory (or the path itself if it is a file)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    if not run_dir.exists():
        raise VimarlError(f"{run_dir} does not exist; pass the OUT directory of a vimarl train run "
                          f"or a checkpoint file")
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise VimarlError(f"no checkpoint in {run_dir}/checkpoints; pass the OUT directory of a "
                          f"vimarl train run")
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    """`python -m vimarl.checkpoint upgrade FILE...`: rewrite trusted format-1 checkpoints."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] != "upgrade":
        print("usage: python -m vimarl.checkpoint upgrade FILE... (only files you trust: the old format "
              "is unpickled, which can run code)", file=sys.stderr)
        return 2
    for name in args[1:]:
        try:
            upgrade(Path(name))
        except VimarlError as error:
            print(f"vimarl: error: {error}", file=sys.stderr)
            return 1
        print(f"upgraded {name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
