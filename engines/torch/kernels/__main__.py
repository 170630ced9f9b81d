"""`python -m engines.torch.kernels`: compile (or load) every CPU kernel now and say which this machine uses.

`make install` and the Docker image run it so that neither `kiln build` nor `kiln serve` pays the one-time
compilation (each kernel is one g++ run of 30-90 s, dominated by torch's headers); on a laptop it answers "why is
it slow here". The kernels compile side by side, one per core (`--jobs`): each is a separate extension with its
own build folder and lock. `--all-levels` also compiles the builds for every lower ISA level this CPU can run
(what the tests run at each level; `make test` asks for it). `--report` compiles nothing: it prints the ISA level
(after KILN_CPU_ISA) and the implementation each op would use at it (dispatch.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from engines import cpu_isa
from engines.torch.kernels import dispatch, extension
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
    parser.add_argument(
        "--all-levels", action="store_true", help="also compile the builds of every lower ISA level this CPU runs"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="kernels compiled at once")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cpu_isa.check()
    except cpu_isa.CpuIsaError as exc:
        print(f"python -m engines.torch.kernels: {exc}", file=sys.stderr)
        return 2
    if not args.report:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            if args.all_levels:
                flags = cpu_isa.cpu_flags()
                builds = [ext for ext in extension.EXTENSIONS if ext.usable_with(flags)]
                for ext, ok in zip(builds, pool.map(lambda ext: ext.available(), builds)):
                    print(f"{ext.name}: {'compiled' if ok else 'unavailable'}", flush=True)
            for name, ok in zip(KERNELS, pool.map(lambda module: module.available(), KERNELS.values())):
                print(f"{name}: {'compiled' if ok else 'unavailable (torch fallback)'}", flush=True)
    print_report(compiled=not args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
