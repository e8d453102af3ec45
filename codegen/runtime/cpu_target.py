"""Numba's CPU target: vectors as wide as the machine has (AVX-512: 16 float32 lanes).

LLVM tunes code for Intel's AVX-512 CPUs (Skylake-X to Emerald Rapids) to prefer
256-bit vectors, a choice made when 512-bit instructions lowered the clock of the
first such parts. The kernels' fused elementwise loops are the widest work they have:
on an Emerald Rapids Xeon the LSTM's forward gates ran 1.45x faster with 512-bit
vectors, a whole float32 call 1.1-1.5x (BENCHMARKS.md, issue 17).

Numba has no switch per function, so ``prefer_full_vector_width`` sets the process's
feature string once, before anything compiles: the host's own features and
"-prefer-256-bit". Numba keys its cache by that string, so code cached under the
other setting is compiled again, never reused. A user's own ``NUMBA_CPU_FEATURES``
wins, as does ``BPTTGEN_VECTOR_WIDTH=256``; a process that compiled with Numba
before importing bpttgen keeps the target it made (its kernels are then only slower).
"""

import os

#: The LLVM tuning flag that caps AVX-512 hosts at 256-bit vectors, switched off.
FULL_WIDTH = "-prefer-256-bit"


def prefer_full_vector_width():
    """Let LLVM use 512-bit vectors on an AVX-512 host; returns whether it set them."""
    from numba import config
    from numba.core.codegen import get_host_cpu_features

    if config.CPU_FEATURES is not None or os.environ.get("BPTTGEN_VECTOR_WIDTH") == "256":
        return False
    features = get_host_cpu_features()
    if "+avx512f" not in features.split(","):
        return False
    config.CPU_FEATURES = f"{features},{FULL_WIDTH}"
    return True
