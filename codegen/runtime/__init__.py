"""The run-time package: everything a generated module imports, and nothing else.

NumPy and Numba only (numba-cuda for cuda.py); it imports nothing from derive/ or
from the build-time modules of codegen/, so a generated trainer runs without SymPy
or jinja2. One job per module:

    calls.py             checks of a call's arguments, backward windows, reused work
                         arrays, parameter initialisation
    trainer.py           the Trainer every generated module subclasses, progress bar
    online.py            RTRL and ARTBP: options, memory estimate, online loops
    distributed.py       data parallel on Dask: Trainer.fit(client=...) (dask lazily)
    kernel_functions.py  the scalar functions kernels inline (vectorising in float32)
    cuda.py              the CUDA twin of calls.py: GEMMs, moves, the CUDA Trainer
    gradcheck.py         a generated module's gradients against finite differences

Generated modules read ``runtime.<name>`` for the names below.
"""

from .calls import (  # noqa: F401 (the surface generated modules use)
    ALGORITHMS, JIT_OPTIONS, ArrayCache, backward_windows, check_call, check_fingerprint,
    init_params, loss_weights, windows)
from .trainer import Progress, Trainer  # noqa: F401
