"""`python -m engines.torch.kernels`: compile (or load) every CPU kernel now and say which this machine uses.

The Docker image runs it at build time so that neither `kiln build` nor `kiln serve` pays the
one-time compilation (~3-4 min for all eight); on a laptop it answers "why is it slow here".
"""

from __future__ import annotations

import logging
import sys

from engines.torch.kernels.registry import KERNELS


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name, module in KERNELS.items():
        print(f"{name}: {'compiled' if module.available() else 'unavailable (torch fallback)'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
