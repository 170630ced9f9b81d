"""Where the data kiln ships beside its code lives: the build profiles and the calibration sets.

The repository keeps them in build/profiles and build/calibration (the layout the project was specified
with). A wheel carries them as the package data engines/_data/profiles and engines/_data/calibration
(pyproject.toml's force-include), found through importlib.resources; a source checkout or an editable
install has no engines/_data and reads them from build/ beside the package.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def data_dir(name: str) -> Path:
    """The folder of shipped data called `name` ("profiles" or "calibration")."""
    packaged = files("engines") / "_data" / name
    if packaged.is_dir():
        # pip installs wheels unpacked, so the package's resources are plain files with a path
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "build" / name
