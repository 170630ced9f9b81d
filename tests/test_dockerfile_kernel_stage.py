"""docker/Dockerfile compiles the CPU kernels from a partial copy of kiln; that copy must hold every module they import.

The stage copies only the kernels and what they need, so that editing the rest of kiln does not recompile them. A
module the kernels start importing later (engines/cpu_isa.py did) then fails the image build, which only the Docker
check sees, at the end of CI. This test asks Python which kiln modules `python -m engines.torch.kernels` loads and
checks each one is copied before that RUN.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from tests.dockerfile_helpers import instructions

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
KERNEL_RUN = "python -m engines.torch.kernels"

LOADED_KILN_FILES = """
import json, runpy, sys
sys.argv = ["kernels", "--report"]
try:
    runpy.run_module("engines.torch.kernels", run_name="__main__")
except SystemExit:
    pass
from engines.torch.kernels.registry import KERNELS  # every kernel module, whichever this machine would use
files = sorted({m.__file__ for name, m in list(sys.modules.items())
                if name.split(".")[0] in ("engines", "server", "build") and getattr(m, "__file__", None)})
print(json.dumps(files))
"""


def copied_before_kernel_build() -> list[str]:
    """Source paths (relative to the repository) the COPY instructions before the kernel RUN bring in."""
    sources: list[str] = []
    for keyword, arguments in instructions(DOCKERFILE):
        if keyword == "RUN" and arguments == KERNEL_RUN:
            return sources
        if keyword == "COPY":
            words = [w for w in shlex.split(arguments) if not w.startswith("--")]
            sources += words[:-1]
    raise AssertionError(f"docker/Dockerfile has no `RUN {KERNEL_RUN}`")


def is_copied(path: Path, sources: list[str]) -> bool:
    relative = path.resolve().relative_to(REPO)
    return any(relative == Path(s) or Path(s) in relative.parents for s in sources)


def test_the_kernel_stage_copies_every_kiln_module_the_kernels_import():
    result = subprocess.run(
        [sys.executable, "-c", LOADED_KILN_FILES], cwd=REPO, capture_output=True, text=True, check=True
    )
    loaded = [Path(f) for f in json.loads(result.stdout.strip().splitlines()[-1])]
    assert any(p.name == "cpu_isa.py" for p in loaded), "the probe did not load the kernels' imports"
    sources = copied_before_kernel_build()
    missing = [str(p.resolve().relative_to(REPO)) for p in loaded if not is_copied(p, sources)]
    assert not missing, f"docker/Dockerfile's kernel stage lacks {missing}; the image build would fail importing them"
