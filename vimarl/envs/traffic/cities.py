"""The public real-city CityFlow maps (Hangzhou 4 x 4, Jinan 3 x 4, New York 16 x 3): where their
files are and how `traffic_<city>` / `sumo_<city>` find them (docs/traffic.md, "Real city maps").

The files are not bundled. They are the CityFlow data of the public repository wingsweihua/colight
(folder `data/`), copied unchanged into a data folder with one sub-folder per city. The folder is

1. `$VIMARL_CITYFLOW_DATA` when set, else
2. `../shared/data/cityflow` relative to the project root (the folder holding the `vimarl`
   package; in the development checkout `/work/shared/data/cityflow`).

A roadnet or flow path that starts with `cityflow:` (the registered city envs' defaults, e.g.
`cityflow:hangzhou/roadnet_4_4.json`) is read from that folder; any other path is used as it is,
so `env.roadnet=PATH env.flow=PATH` overrides the data folder altogether.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vimarl.errors import VimarlError

PREFIX = "cityflow:"
"""Paths starting with this are read from the CityFlow data folder."""
ENV_VAR = "VIMARL_CITYFLOW_DATA"
"""Environment variable naming the CityFlow data folder."""
PROJECT_ROOT = Path(__file__).resolve().parents[3]
"""The folder that holds the `vimarl` package (the repository root in a checkout)."""
COLIGHT = "github.com/wingsweihua/colight"
COLIGHT_COMMIT = "04440b722e7f36d7043a3f2ad8e40c3df301fad3"
"""The public copies: this repository at this commit, folder data/ (README of the data folder)."""


@dataclass(frozen=True)
class City:
    name: str
    """The env name's suffix: traffic_<name>, sumo_<name>."""
    folder: str
    """Sub-folder of the data folder."""
    roadnet: str
    flow: str
    colight_folder: str
    """Where the same files are in the colight repository."""
    intersections: int
    """Signalised intersections (agents)."""
    description: str


CITIES = {
    "hangzhou_4x4": City("hangzhou_4x4", "hangzhou", "roadnet_4_4.json", "anon_4_4_hangzhou_real.json",
                         "data/Hangzhou/4_4", 16, "Gudang sub-district, Hangzhou, 4 x 4 (000 Fig. 10 a), 2,983 "
                         "vehicles in 1 h"),
    "jinan_3x4": City("jinan_3x4", "jinan", "roadnet_3_4.json", "anon_3_4_jinan_real.json", "data/Jinan/3_4", 12,
                      "Dongfeng sub-district, Jinan, 3 x 4, 6,295 vehicles in 1 h"),
    "newyork_16x3": City("newyork_16x3", "newyork", "roadnet_16_3.json", "anon_16_3_newyork_real.json",
                         "data/NewYork/16_3", 48, "Upper East Side, Manhattan, 16 x 3, 2,824 vehicles in 1 h"),
}


def data_dir() -> Path:
    """The CityFlow data folder ($VIMARL_CITYFLOW_DATA, else ../shared/data/cityflow from the project root)."""
    override = os.environ.get(ENV_VAR)
    return Path(override).expanduser() if override else (PROJECT_ROOT.parent / "shared" / "data" / "cityflow")


def _city_of(relative: str) -> City | None:
    folder = relative.split("/", 1)[0]
    return next((c for c in CITIES.values() if c.folder == folder), None)


def missing_message(path: Path, relative: str) -> str:
    """The one-line error for a city file that is not in the data folder."""
    city = _city_of(relative)
    where = f"{city.colight_folder}/{Path(relative).name}" if city else f"data/ ({relative})"
    return (f"CityFlow file {path} not found: the public copy is {where} of {COLIGHT} at commit {COLIGHT_COMMIT}; "
            f"put it at that path, or set {ENV_VAR} to a folder holding hangzhou/, jinan/, newyork/ with these "
            f"files, or pass env.roadnet=PATH env.flow=PATH")


def resolve(path: str | Path) -> Path:
    """A roadnet / flow path: `cityflow:REL` from the data folder (a one-line VimarlError naming
    the public copies when it is absent), any other path unchanged."""
    text = str(path)
    if not text.startswith(PREFIX):
        return Path(path)
    relative = text[len(PREFIX):].lstrip("/")
    full = data_dir() / relative
    if not full.is_file():
        raise VimarlError(missing_message(full, relative))
    return full


def missing(path: str | Path) -> str | None:
    """None when `path` can be read, else the one-line reason (for skips)."""
    try:
        resolved = resolve(path)
    except VimarlError as error:
        return str(error)
    return None if resolved.is_file() else f"{resolved} not found"
