"""Time to derive every built-in model: derive(build(name)), the definition included.

    python bench/derive_time.py [--repeat N]

Each measurement runs in a fresh Python process (``import derive`` excluded from
the time), so SymPy starts with empty caches, as a user's ``bpttgen`` command
does: the median of N such runs is reported, with the fastest. Goal: < 2 s per
model.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys

import sympy

from bpttgen.derive.models import BUILTIN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ONE_RUN = """
import time
from bpttgen.derive import derive
from bpttgen.derive.models import build
start = time.perf_counter()
D = derive(build({name!r}))
print(time.perf_counter() - start, len(D.nodes), sum(t.rule == "local" for t in D.backward.terms))
"""


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_once(name):
    out = subprocess.run([sys.executable, "-c", ONE_RUN.format(name=name)], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), int(out[1]), int(out[2])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="fresh-process runs per model")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} CPUs ({cpu_model()}), Python "
          f"{platform.python_version()}, SymPy {sympy.__version__}, load average {load:.1f}")
    print(f"{'model':<15} {'nodes':>5} {'partials':>8} {'median s':>9} {'min s':>7}")
    worst = 0.0
    for name in BUILTIN:
        runs = [time_once(name) for _ in range(args.repeat)]
        times = [r[0] for r in runs]
        worst = max(worst, statistics.median(times))
        print(f"{name:<15} {runs[0][1]:>5} {runs[0][2]:>8} {statistics.median(times):>9.3f} "
              f"{min(times):>7.3f}")
    print(f"slowest median: {worst:.3f} s (goal < 2 s per model): "
          f"{'met' if worst < 2 else 'NOT met'}")


if __name__ == "__main__":
    main()
