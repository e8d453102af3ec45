"""What both experiments print about the run: the code measured and the load."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_version():
    """The commit of bpttgen's generated modules (BPTTGEN_COMMIT for a snapshot made
    with `git archive`, which has no .git)."""
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "generated",
                                "codegen", "templates"], capture_output=True, text=True,
                               check=True).stdout.strip()
        return commit + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("BPTTGEN_COMMIT", "unknown")


def load_average():
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def pin_threads(argv, default=2):
    """Thread count of every BLAS/OpenMP pool from a --threads N argument; must run
    before numpy is imported (pools are sized when a library loads)."""
    n = str(default)
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            n = argv[i + 1]
        elif a.startswith("--threads="):
            n = a.split("=", 1)[1]
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = n
