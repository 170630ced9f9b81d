"""kiln replicas behind real routers on loopback (issue #21): (a) haproxy failover on SIGTERM, (b) vllm-router
cache_aware against round_robin by kiln's prefix-cache hit rate, (c) Prometheus and the HPA formula.

    python -m bench.scaleout                      # all three; `make test-scaleout` runs them and checks the goals
    python -m bench.scaleout --only failover

Prints a Markdown table per scenario; writes them to bench/results/scaleout.md, the measurements to
bench/results/scaleout.json and one PNG per scenario (bench/results/scaleout-<scenario>.png). Process logs
(replicas, haproxy, router, Prometheus) stay in a temporary folder whose path is printed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.event_loop import RESULTS, cpu_model
from bench.scaleout import autoscale, failover, prefix_routing

SCENARIOS = {"failover": failover, "prefix_routing": prefix_routing, "autoscale": autoscale}


def plot(name: str, result: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    SCENARIOS[name].plot(result, ax)
    fig.tight_layout()
    path = RESULTS / f"scaleout-{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_all(names: list[str]) -> dict:
    RESULTS.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="kiln-scaleout-"))
    print(f"logs in {work_dir}", flush=True)
    doc: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(), "runs": {}}
    started = time.monotonic()
    tables = []
    for name in names:
        scenario_started = time.monotonic()
        (work_dir / name).mkdir()
        result = SCENARIOS[name].run(work_dir / name, work_dir / "logs")
        result["run_s"] = round(time.monotonic() - scenario_started, 1)
        doc["runs"][name] = result
        tables.append(f"{SCENARIOS[name].table(result)}\n\n({name}: {result['run_s']} s)\n")
        print(tables[-1], flush=True)
        plot(name, result)
    doc["run_s"] = round(time.monotonic() - started, 1)
    (RESULTS / "scaleout.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "scaleout.md").write_text("\n".join(tables) + f"\ntotal {doc['run_s']} s on {doc['cpu']}\n")
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    doc = run_all(parser.parse_args().only)
    print(f"total {doc['run_s']} s; wrote {RESULTS}/scaleout.json, scaleout.md, scaleout-*.png")


if __name__ == "__main__":
    main()
