"""How long `--help` takes for every script: the median wall time of a fresh `python SCRIPT --help`.

    python benchmarks/bench_help.py [--repeats 5]

The scripts import torch and accelerate at the top and diffusers / transformers only where they are used, so
`--help` answers without waiting for the libraries that take longest to import.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in REPO.glob("train_dti_*.py")) + ["infer.py", "evaluate.py"]


def help_seconds(script, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / script), "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--repeats", type=int, default=5, help="Runs per script; the median is printed. Default: 5.")
    args = parser.parse_args()
    help_seconds(SCRIPTS[0], 1)  # the first run also writes the byte-code caches
    print(f"{'script':<26} --help (median of {args.repeats})")
    for script in SCRIPTS:
        print(f"{script:<26} {help_seconds(script, args.repeats):.2f} s")


if __name__ == "__main__":
    main()
