"""Episode GIFs from an environment's `render()`."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_gif(frames: list[np.ndarray], path: Path, fps: int = 4) -> Path:
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(path, frames, duration=1000.0 / fps, loop=0)
    return path
