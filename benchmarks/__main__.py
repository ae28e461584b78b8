"""Run benchmarks and write one JSON file each under benchmarks/results/."""

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

BENCHMARKS = [
    "ingest_throughput",
    "ingest_scale",
    "feedback_scale",
    "detection_feedback_scale",
    "label_qa",
    "training_throughput",
    "training_precision",
    "optimizer_step",
    "export_latency",
    "release_delta",
    "edge_stream",
    "active_learning",
    "drift_detection",
    "demo_wall",
    "loop_gain",
    "loop_convergence",
    "loop_latency",
    "run_overhead",
    "detection_recipe",
    "detection_loop_gain",
    "detection_export",
    "detection_label_qa",
    "ssl_label_efficiency",
]
RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", default=BENCHMARKS, help=f"subset of {BENCHMARKS}")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"== {name}", flush=True)
        started = time.time()
        result = module.run(quick=args.quick)
        result["machine"] = {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        }
        result["wall_s"] = round(time.time() - started, 1)
        out = RESULTS / f"{name}.json"
        out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
