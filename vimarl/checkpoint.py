"""Atomic checkpoint files: write to a temporary file, fsync, rename, fsync the folder."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from vimarl.errors import VimarlError

FORMAT = "vimarl-checkpoint"
VERSION = 1
_NAME = re.compile(r"step_(\d+)\.pt$")


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


def save(path: Path, content: dict[str, Any]) -> None:
    atomic_write(path, lambda file: torch.save({"format": FORMAT, "version": VERSION, **content}, file))


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's content, or a one-line VimarlError if it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise VimarlError(f"checkpoint {path} does not exist; pass a run directory or a .pt file "
                          f"written by vimarl train")
    try:
        content = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise VimarlError(f"checkpoint {path} is corrupt or not a vimarl checkpoint ({reason}); "
                          f"delete it to fall back to an earlier one, or retrain") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise VimarlError(f"{path} is not a vimarl checkpoint; pass one from OUT/checkpoints/")
    if content.get("version") != VERSION:
        raise VimarlError(f"checkpoint {path} has format version {content.get('version')}, this "
                          f"vimarl reads version {VERSION}; use the vimarl that wrote it")
    return content


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
