"""`python -m engines.torch.kernels`: compile (or load) every CPU kernel now and say which this machine uses.

The Docker image runs it at build time so that neither `kiln build` nor `kiln serve` pays the
one-time compilation (~3-4 min for all eight); on a laptop it answers "why is it slow here".
`--report` compiles nothing: it prints the ISA level (after KILN_CPU_ISA) and the implementation each op would
use at it (dispatch.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

from engines import cpu_isa
from engines.torch.kernels import dispatch
from engines.torch.kernels.registry import KERNELS


def print_report(compiled: bool) -> None:
    print(f"CPU ISA level: {cpu_isa.describe()}")
    flags = cpu_isa.cpu_flags()
    for op, module in dispatch.ops().items():
        variant = dispatch.chosen(module, flags, compiled)
        print(f"  {op}: {dispatch.label(variant)}" + (f" ({variant.name})" if variant else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.torch.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="compile nothing; say which variant each op uses")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cpu_isa.check()
    except cpu_isa.CpuIsaError as exc:
        print(f"python -m engines.torch.kernels: {exc}", file=sys.stderr)
        return 2
    if not args.report:
        for name, module in KERNELS.items():
            print(f"{name}: {'compiled' if module.available() else 'unavailable (torch fallback)'}", flush=True)
    print_report(compiled=not args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
