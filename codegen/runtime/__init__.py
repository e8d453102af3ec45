"""The run-time package: everything a generated module imports, and nothing else.

NumPy, Numba, tqdm and threadpoolctl (numba-cuda for cuda.py, matplotlib for plots.py,
dask for distributed.py); it imports nothing from derive/ or from the build-time
modules of codegen/, so a generated trainer runs without SymPy or jinja2. One job per module:

    calls.py             checks of a call's arguments, backward windows, reused work
                         arrays, parameter initialisation
    driver.py            Model: the model-independent half of a CPU module (workspace,
                         algorithms, gradients, L2, the RTRL driver)
    trainer.py           the Trainer every generated module subclasses
    progress.py          the progress bar (tqdm's) of fit, generate and check
    plots.py             training curves as a PNG (matplotlib, headless)
    online.py            RTRL and ARTBP: options, memory estimate, online loops
    checkpoint.py        checkpointed BPTT: binomial schedules, memory plans, the run
    stream.py            the online engines fed chunks: Trainer.fit_stream
    split.py             one call's batch split over threads (threadpoolctl)
    distributed.py       data parallel on Dask: Trainer.fit(client=...) (dask lazily)
    kernel_functions.py  the scalar functions kernels inline (vectorising in float32)
    cuda.py              the CUDA twin of calls.py: GEMMs, moves, the CUDA Trainer
    gradcheck.py         a generated module's gradients against finite differences

Generated modules read ``runtime.<name>`` for the names below.
"""

from .calls import (  # noqa: F401 (the surface generated modules use)
    ALGORITHMS, BIDIRECTIONAL_ALGORITHMS, JIT_OPTIONS, PHASE_OPTIONS, ArrayCache,
    backward_windows, check_call, check_direction, check_fingerprint, init_params, input_width,
    loss_weights, pack_inputs, windows)
from .calls import (  # noqa: F401 (the stages of a module's _run)
    BACKWARD, BACKWARD_REVERSE, GRADIENTS, LOSS, POST_ADJOINTS, READOUT, STATES)
from .driver import Model  # noqa: F401
from .online import ALGORITHMS as _ONLINE

#: What a CPU module computes: the reverse algorithms, checkpointed BPTT, the online ones.
CPU_ALGORITHMS = ALGORITHMS + ("checkpoint",) + _ONLINE
from .progress import Progress  # noqa: F401
from .trainer import Trainer  # noqa: F401
