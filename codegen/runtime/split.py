"""One call's batch split over threads: each thread runs the whole call on its rows.

Why. A step of the recurrence is a small matrix product ((B x H)(H x G H)) and the
elementwise work between products. A multi-threaded BLAS splits each small product
over the cores, with a hand-over per product, while the elementwise work, the loss
and the zeroing of work arrays run on one core. The sequences of a batch do not
interact until their gradients are summed, so each core can instead run the whole
call (every phase, its own time loops, a one-thread BLAS) on its share of the rows,
with no synchronisation until the end. Measured on a 2-core AVX-512 Xeon, float32
(bench/split_ab.py, two runs), at (B, T, I, H, O) = (32, 128, 64, 128, 64): Elman
1.24-1.38x, LSTM 1.06-1.11x, GRU 1.36-1.46x; at (32, 512, 64, 128, 64): 1.26-1.35x,
1.11-1.22x, 1.47-1.49x.

When (``count``). Where the time loop's weights are large, the cores' share of a
BLAS product is also their share of the weights, which then stay in each core's own
cache: split by rows, every core streams all of them each step. Elman at
(64, 128, 256, 512, 256), 1 MiB of recurrent weights, ran 0.89x split; LSTM with
4 MiB 1.02x, GRU with 3 MiB 0.91x. And each thread needs rows enough to keep its
products efficient and work enough to pay for the hand-over. So by default a call is
split over the BLAS's thread count (a Dask worker's is 1: it never splits) when the
loop's weights take at most ``MAX_WEIGHT_BYTES``, each thread gets at least
``MIN_ROWS`` rows and ``MIN_WORK`` work. A rule on
sizes, not a timing: a call gives the same numbers each time it is made. A forward
call splits by the same rule, its work counted a third (it multiplies each parameter
once per row and step, a call with gradients three times): Model.pieces.

One cost seen: OpenBLAS's idle threads spin on a core for a while (~0.1 s) after a
product it ran on several threads, so a split call right after an unsplit one (of
other sizes, or a forward) ran its pieces at 44-52 ms against 21-30 ms (the LSTM
above). Consecutive split calls, as a training loop makes, do not meet it.

Exact. The loss is a weighted sum over sequences, L = sum_tb w_tb l_tb / W (the
derivation's, derive/reference.py), so with piece s holding the weight W_s and
returning L_s, g_s: L = sum_s (W_s / W) L_s and g = sum_s (W_s / W) g_s, up to
rounding (float32: a few ulp; float64: 1e-15). distributed.py sums its shards so too.
"""

import numbers
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

#: Algorithms whose gradient is a sum over sequences at fixed weights: the windows of
#: naive and tbptt depend on T alone. Not artbp (its cuts are drawn per call), rtrl
#: (its sensitivities are state) or checkpoint (segments of its own).
ALGORITHMS = ("bptt", "epochwise", "naive", "tbptt")
#: The loop's weights (bytes) above which a call is not split: each core's L2 (2 MiB
#: on the machine measured) should hold them with the step's rows beside them.
MAX_WEIGHT_BYTES = 512 * 1024
#: Rows each thread gets at least: below this its products lose more than a core gains.
MIN_ROWS = 16
#: Work each thread gets at least, as steps x rows x parameters (every parameter is
#: multiplied about once per row and step): 2^25, a few ms of compute. A split costs
#: 0.5-0.7 ms more than the call on this VM, whose idle threads wake slowly (a round
#: trip of two empty tasks through a pool: 0.2 ms); at 2^23 (Elman and LSTM calls of
#: 2.5-3 ms) the split ran 0.73-1.13x, from 2^25 on 1.06-1.5x (BENCHMARKS.md).
MIN_WORK = 1 << 25

_lock = threading.Lock()  # one split call at a time: each takes every core
_pool, _pool_size = None, 0
_blas = None


def _forget_pool():
    global _pool, _pool_size, _lock
    # a forked child has none of its parent's threads
    _pool, _pool_size, _lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _blas_controller():
    """threadpoolctl's handle on the loaded BLAS libraries, NumPy's and the one Numba's
    np.dot calls (scipy's, loaded here first so that it is among them)."""
    global _blas
    if _blas is None:
        import scipy.linalg.cython_blas  # noqa: F401
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController().select(user_api="blas")
    return _blas


def available():
    """Threads a call may use: the BLAS's thread count (OPENBLAS_NUM_THREADS,
    threadpoolctl's limits), at most the CPUs this process may run on."""
    blas = max((c.num_threads for c in _blas_controller().lib_controllers), default=1)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(blas, cpus or 1))


def count(threads, algorithm, T, B, loop_weight_bytes, parameters):
    """Pieces to split a call of B sequences into: ``threads`` as given (at most B), or
    for ``threads=None`` $BPTTGEN_THREADS where it is set (a call of an algorithm that
    cannot be split then runs whole), else the rule above. 1: do not split (the same
    numbers on every machine: a split rounds by its pieces)."""
    if threads is None and os.environ.get("BPTTGEN_THREADS"):
        try:
            default = int(os.environ["BPTTGEN_THREADS"])
        except ValueError:
            default = 0
        if default < 1:
            raise ValueError(f"BPTTGEN_THREADS must be a positive integer, got "
                             f"{os.environ['BPTTGEN_THREADS']!r}")
        # a default: an algorithm that cannot be split runs whole
        return min(default, B) if algorithm in ALGORITHMS else 1
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) \
                or threads < 1:
            raise ValueError(f"threads must be a positive integer (or None: decided by "
                             f"sizes), got {threads!r}")
        if threads > 1 and algorithm not in ALGORITHMS:
            raise ValueError(f"threads={threads} splits the batch of {ALGORITHMS}, not "
                             f"algorithm={algorithm!r}; leave threads=None")
        return min(int(threads), B)
    if algorithm not in ALGORITHMS or loop_weight_bytes > MAX_WEIGHT_BYTES:
        return 1
    n = min(available(), B // MIN_ROWS)
    while n > 1 and T * (B // n) * parameters < MIN_WORK:
        n -= 1
    return max(n, 1)


def pieces(B, n):
    """Rows [lo, hi) of each of n pieces of B rows, as even as can be."""
    return [(i * B // n, (i + 1) * B // n) for i in range(n)]


def rows(tree, lo, hi, axis=0):
    """Each array of a dict (or an array; None stays None) cut to rows lo:hi along
    ``axis``, contiguous: a piece's share of initial states, a mask, a shard's data."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: rows(v, lo, hi, axis) for k, v in tree.items()}
    index = [slice(None)] * tree.ndim
    index[axis] = slice(lo, hi)
    return np.ascontiguousarray(tree[tuple(index)])


def run(calls):
    """The results of ``calls`` (functions of no argument), in order, each run on a
    thread of a pool, every BLAS at one thread meanwhile. The kernels release the GIL
    (kernel_functions.JIT_OPTIONS: nogil). Not in the calling thread: its work arrays
    (calls.ArrayCache, one set per thread) stay those of its own calls, which an
    unsplit call of other sizes, between two split ones, would otherwise replace."""
    global _pool, _pool_size
    with _lock, _blas_controller().limit(limits=1):
        if _pool_size < len(calls):
            if _pool is not None:
                _pool.shutdown(wait=False)  # its threads end, and their work arrays go
            _pool = ThreadPoolExecutor(len(calls), thread_name_prefix="bpttgen-split")
            _pool_size = len(calls)
        futures = [_pool.submit(call) for call in calls]
        wait(futures)  # all of them, before the BLAS gets its threads back
    return [f.result() for f in futures]  # raises a piece's exception


def combine(weights, results):
    """(loss, grads) of a whole batch from its pieces' (loss_s, grads_s), piece s
    holding the loss weight weights[s]: the sums above, in piece order."""
    total = sum(weights)
    loss, grads = 0.0, None
    for w, (loss_s, grads_s) in zip(weights, results):
        share = w / total
        loss += share * loss_s
        if grads is None:
            grads = {name: g * share for name, g in grads_s.items()}
        else:
            for name, g in grads_s.items():
                grads[name] += g * share
    return loss, grads
