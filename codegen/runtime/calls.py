"""What every generated module's functions share at run time: the checks of a call's
arguments, the schedule of backward windows for each algorithm, reused work arrays,
parameter initialisation. NumPy and Numba only.
"""

import math
import os
import threading
import weakref

import numpy as np

from .kernel_functions import JIT_OPTIONS, PHASE_OPTIONS, fingerprint  # noqa: F401 (modules)

#: The phases of a module's _run, as bits of its first argument.
STATES = 1  # the pre-loop nodes and the recurrence(s): the states at every step
READOUT = 2  # the post-loop nodes: the output z
LOSS = 4  # the loss, the predictions y and dl/dz (returned: the weighted loss sum)
POST_ADJOINTS = 8  # the post-loop nodes' adjoints
BACKWARD = 16  # the accumulated recurrence, steps t_hi down to t_lo
BACKWARD_REVERSE = 32  # a reverse state's, steps t_lo up to t_hi
GRADIENTS = 64  # the pre-loop adjoints, then the weight and bias gradients
#: Forward and loss with its adjoints: what every algorithm runs before its backward.
FORWARD_AND_LOSS = STATES | READOUT | LOSS | POST_ADJOINTS
EVERY_STAGE = FORWARD_AND_LOSS | BACKWARD | BACKWARD_REVERSE | GRADIENTS

#: Stacked weights of a product inside a time loop with at most this many elements
#: reach the kernels also transposed, contiguous: x_t W^T is then an untransposed
#: product, for which OpenBLAS has a faster path at small sizes. A step of the LSTM
#: at B = 8, H = 128, (8 x 128)(128 x 512): 23.4 us with W^T, 6.9 us with the copy (an
#: Emerald Rapids Xeon, OpenBLAS 0.3.30); at B = 32, 41.0 against 38.3 us; above this
#: size the two were even or the copy slower (H = 512, 4 gates: 738 against 759 us).
#: A rule on sizes, not a timing at the first call: the two products can round
#: differently, and a run must give the same numbers each time.
SMALL_WEIGHTS = 128 * 512


def check_fingerprint(module_name, stated):
    """Warn when a generated module was made against other kernel functions:
    Numba's cache does not see changes in functions a kernel inlines."""
    if stated != fingerprint():
        import warnings

        warnings.warn(f"{module_name} was generated against different kernel functions "
                      "(codegen/kernel_functions.py changed); regenerate it", stacklevel=3)


ALGORITHMS = ("bptt", "naive", "tbptt", "epochwise")

#: What a model with a reverse state (a bidirectional layer) computes. Its reverse
#: direction's step t reads every later input: the online algorithms (tbptt, artbp,
#: rtrl), which learn forward in time from what they have seen, cannot run it, nor can
#: the checkpointed BPTT, whose segments recompute the trajectory forward in time.
BIDIRECTIONAL_ALGORITHMS = ("bptt", "naive", "epochwise")


def check_direction(name, spec, algorithm):
    """Refuse an algorithm that cannot run a model's reverse states, saying why."""
    reverse = spec.get("reverse", ())
    if reverse and algorithm in ("tbptt", "artbp", "rtrl", "checkpoint"):
        kind = ("recomputes the trajectory forward in time, segment by segment"
                if algorithm == "checkpoint" else "learns online, forward in time")
        raise ValueError(
            f"algorithm={algorithm!r} cannot train {name}: its state(s) {list(reverse)} run "
            f"in reverse (from the last step down), so step t needs every later input, "
            f"and {algorithm} {kind}; use one of {BIDIRECTIONAL_ALGORITHMS}")


#: Set to 1 to fill every work array that a call does not start zeroed or with ones
#: with NaN, when it is allocated and when it is reused: a kernel that read such an
#: array before writing it would then give NaN rather than a number left from an
#: earlier call. For tests and the fuzzer (``ArrayCache.poison``); a fill per call.
POISON = os.environ.get("BPTTGEN_POISON_WORKSPACE", "") not in ("", "0")


class ArrayCache:
    """The work arrays of a module's last call, per thread, for the next call of the
    same sizes: a training loop then neither allocates nor page-faults its
    trajectory (fresh pages cost about as much again as writing them: ~9 ms per
    64 MB here). On reuse the arrays named in ``zeros`` are zeroed and those in
    ``ones`` filled with ones, as a fresh allocation would give them; the rest are
    overwritten by the kernels before they are read (the layout says which: plan.py,
    ``Plan.overwritten``), and with ``poison`` set are filled with NaN to show it.
    Results handed to a caller must be copies. ``clear()`` frees the arrays of every
    thread."""

    def __init__(self, zeros=(), ones=(), poison=None):
        self.zeros, self.ones = tuple(zeros), tuple(ones)
        self.poison = POISON if poison is None else poison
        self._local = threading.local()
        # every thread's slot, for clear(); a thread's goes when the thread ends
        self._slots, self._lock = weakref.WeakSet(), threading.Lock()

    def _slot(self):
        slot = getattr(self._local, "slot", None)
        if slot is None:
            slot = self._local.slot = _Slot()
            with self._lock:
                self._slots.add(slot)
        return slot

    def get(self, key, allocate):
        """The arrays for ``key`` (a tuple of sizes and dtype): the cached ones if the
        last call of this thread had the same key, else ``allocate(*key)``."""
        slot = self._slot()
        last = slot.last
        if last is not None and last[0] == key:
            arrays = last[1]
            for name in self.zeros:
                arrays[name].fill(0)
            for name in self.ones:
                arrays[name].fill(1)
        else:
            slot.last = None  # free the old arrays before allocating new ones
            arrays = allocate(*key)
            slot.last = (key, arrays)
        if self.poison:
            for name, a in arrays.items():
                if name not in self.zeros and name not in self.ones and \
                        isinstance(a, np.ndarray) and a.dtype.kind == "f":
                    a.fill(np.nan)
        return arrays

    def clear(self):
        with self._lock:
            for slot in self._slots:
                slot.last = None


class _Slot:
    """One thread's entry of an ArrayCache: (key, arrays) of its last call, or None."""

    __slots__ = ("last", "__weakref__")

    def __init__(self):
        self.last = None


def windows(algorithm, T, k1=None, k2=None):
    """Backward windows (end, start, first loss step), or None for one full sweep.

    Each window injects the losses of steps first..end and propagates them back to
    step ``start``, where the recurrence is cut. naive: every step alone through
    all earlier ones (seed 000's O(T^2)); tbptt: every k1 steps, the last k1
    losses through the last k2 steps (seed 003).

    >>> windows("tbptt", 5, k1=2, k2=3).tolist()
    [[1, 0, 0], [3, 1, 2], [4, 2, 4]]
    """
    if algorithm in ("bptt", "epochwise"):
        if k1 is not None or k2 is not None:
            raise ValueError(f"k1/k2 apply to algorithm='tbptt', not {algorithm!r}")
        return None
    if algorithm == "naive":
        return np.array([(t, 0, t) for t in range(T)], dtype=np.int64)
    if algorithm == "tbptt":
        if k1 is None or k2 is None:
            raise ValueError("algorithm='tbptt' needs k1 and k2 (every k1 steps, "
                             "backpropagate over the last k2)")
        if not (isinstance(k1, (int, np.integer)) and isinstance(k2, (int, np.integer))):
            raise TypeError(f"k1 and k2 must be integers, got {k1!r} and {k2!r}")
        if not 1 <= k1 <= k2:
            raise ValueError(f"tbptt needs 1 <= k1 <= k2, got k1={k1}, k2={k2} "
                             "(with k2 < k1 some losses would never be backpropagated)")
        ends = list(range(k1 - 1, T, k1))
        if not ends or ends[-1] != T - 1:
            ends.append(T - 1)
        out, first = [], 0
        for end in ends:
            out.append((end, max(0, end - k2 + 1), first))
            first = end + 1
        return np.array(out, dtype=np.int64)
    raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}")


def backward_windows(kernel, args, ws, T, B, plan, local):
    """Run the time-loop backward kernel over each window of ``plan``.

    ``kernel(t_hi, t_lo, arrays)`` takes the workspace's entries named in ``args``, as
    one tuple. ``local`` lists (array name, rows are (T+1)*B, accumulate over windows)
    for the adjoints private to a window. With ``plan`` None (full BPTT) the kernel
    runs once on the workspace itself: no copies.
    """
    if plan is None:
        kernel(T - 1, 0, tuple([ws[a] for a in args]))
        return
    win = {name: np.zeros_like(ws[name]) for name, _, _ in local}
    total = {name: np.zeros_like(ws[name]) for name, _, acc in local if acc}
    call = tuple([win.get(a, ws.get(a)) for a in args])
    for end, start, first in plan:
        for name, shifted, _ in local:
            a, s = win[name], B if shifted else 0
            a[start * B:(end + 1) * B + s] = 0
            a[first * B + s:(end + 1) * B + s] = ws[name][first * B + s:(end + 1) * B + s]
        kernel(end, start, call)
        for name, arr in total.items():
            arr[start * B:(end + 1) * B] += win[name][start * B:(end + 1) * B]
    for name, arr in total.items():
        ws[name][...] = arr


def reverse_windows(kernel, args, ws, T, B, plan, local):
    """The reverse states' backward over the windows of ``plan`` (see backward_windows),
    mirrored: a reverse state's adjoint flows from step t to step t+1, so each window's
    losses (steps first..end) propagate from step first up to step T-1.

    ``kernel(t_lo, t_hi, arrays)``. Of the (T+1)*B-row arrays in ``local`` the kernel
    reads the reverse states' adjoints only, s_t at row t*B and its previous value's at
    (t+1)*B, hence no shift here. An array the kernel does not touch sums back to what
    it held (each row is injected by exactly one window), so this runs after
    backward_windows has summed the forward states' windows."""
    win = {name: np.zeros_like(ws[name]) for name, _, _ in local}
    total = {name: np.zeros_like(ws[name]) for name, _, acc in local if acc}
    call = tuple([win.get(a, ws.get(a)) for a in args])
    for end, _, first in plan:
        for name, _, _ in local:
            win[name][first * B:] = 0
            win[name][first * B:(end + 1) * B] = ws[name][first * B:(end + 1) * B]
        kernel(first, T - 1, call)
        for name, arr in total.items():
            arr[first * B:] += win[name][first * B:]
    for name, arr in total.items():
        ws[name][...] = arr


def stacked_rows(groups, rows):
    """(group, weight, first row, end, first of its sums) of each weight stacked in a
    product group, from ((group, member weights), ...) and rows(weight), its row count:
    a weight's rows of the group's stacked gradient are its own, in stacking order; a
    weight used in several products (W h and W x) has rows in each, which sum: its
    first assigns, the rest add."""
    out, seen = [], set()
    for group, weights in groups:
        row = 0
        for w in weights:
            out.append((group, w, row, row + rows(w), w not in seen))
            row += rows(w)
            seen.add(w)
    return tuple(out)


# -- checks -------------------------------------------------------------------
# Every check runs before any kernel: a Numba kernel given a wrong shape or dtype
# fails with a typing traceback, reads out of bounds or silently returns garbage.
# Non-contiguous arrays are not refused: the generated code copies them.


def _fail(kind, message):
    raise kind(message)


def _shape_of(a):
    return getattr(a, "shape", type(a).__name__)


def _require_finite(name, a):
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0]
        _fail(ValueError, f"{name} contains NaN or Inf (first at index {tuple(bad.tolist())}, "
              f"value {a[tuple(bad)]})")


def check_call(spec, params, x, targets=None, state0=None, mask=None, l2=None):
    """Validate a call before any kernel runs; return (sizes, T, B, dtype).

    Every message names the argument, the expected and the actual shape/dtype.
    ``targets`` None means a forward call (no loss).
    """
    if not isinstance(params, dict):
        _fail(TypeError, f"params must be a dict of arrays, got {type(params).__name__}")
    missing = [p for p in spec["params"] if p not in params]
    if missing:
        _fail(ValueError, f"params is missing {missing}; expected keys {list(spec['params'])}")
    extra = [p for p in params if p not in spec["params"]]
    if extra:
        _fail(ValueError, f"params has unknown keys {extra}; expected keys "
              f"{list(spec['params'])}")
    for name in spec["params"]:
        if not isinstance(params[name], np.ndarray):
            _fail(TypeError, f"params[{name!r}] must be a numpy array, got "
                  f"{type(params[name]).__name__}")
    first = next(iter(spec["params"]))
    dtype = params[first].dtype
    if dtype not in (np.float32, np.float64):
        _fail(TypeError, f"params must be float32 or float64 arrays, got dtype {dtype} "
              f"for params[{first!r}]")
    sizes = {}
    for name, shape in spec["params"].items():
        p = params[name]
        if p.dtype != dtype:
            _fail(TypeError, f"params[{name!r}] has dtype {p.dtype}, expected {dtype} "
                  "like the other parameters")
        if p.ndim != len(shape):
            _fail(ValueError, f"params[{name!r}] has shape {p.shape}, expected "
                  f"{len(shape)} dimensions {shape}")
        for size, n in zip(shape, p.shape):
            if sizes.setdefault(size, n) != n:
                _fail(ValueError, f"params[{name!r}] has shape {p.shape} but {size} = "
                      f"{sizes[size]} from the other parameters (expected "
                      f"{tuple(sizes.get(s, s) for s in shape)})")
            if n < 1:
                _fail(ValueError, f"params[{name!r}] has shape {p.shape}: size {size} "
                      "must be at least 1")
        _require_finite(f"params[{name!r}]", p)
    T, B = check_data(spec, sizes, dtype, x, targets, state0, mask)
    if l2 is not None and not (isinstance(l2, (int, float, np.floating, np.integer))
                               and math.isfinite(l2) and l2 >= 0):
        _fail(ValueError, f"l2 must be a finite number >= 0, got {l2!r}")
    return sizes, T, B, dtype


def check_data(spec, sizes, dtype, x, targets=None, state0=None, mask=None):
    """check_call's checks of the data, given the sizes and dtype of checked
    parameters; (T, B). A checkpointed call checks each segment so, as it reads it."""
    T, B = (_check_tokens if spec.get("tokens") else _check_vectors)(spec, sizes, dtype, x)
    out_size = spec["output"][1]
    if targets is not None:
        _check_targets(spec, targets, T, B, sizes[out_size], dtype)
    if state0 is not None:
        _check_state0(spec, state0, B, sizes, dtype)
    if mask is not None:
        if not isinstance(mask, np.ndarray) or mask.shape != (T, B):
            _fail(ValueError, f"mask must have shape (T, B) = {(T, B)}, got {_shape_of(mask)}")
        if not (np.issubdtype(mask.dtype, np.floating) or np.issubdtype(mask.dtype, np.integer)
                or mask.dtype == np.bool_):
            _fail(TypeError, f"mask must hold numbers (float, int or bool), got dtype "
                  f"{mask.dtype}")
        _require_finite("mask", mask)
        if np.any(mask < 0):
            _fail(ValueError, f"mask must be non-negative, got minimum {mask.min()}")
    return T, B


def input_width_text(spec):
    """The width of x as a formula of sizes: "I", or "I + C" for several inputs."""
    return " + ".join(size for _, size in spec["inputs"])


def input_width(spec, sizes):
    """The width of x: the sizes of the inputs side by side."""
    return sum(sizes[size] for _, size in spec["inputs"])


def _check_vectors(spec, sizes, dtype, x):
    """(T, B) of vectors, x: (T, B, width) in the parameters' dtype, the inputs side
    by side; its width tells the input size no parameter has (derive allows one)."""
    width = input_width_text(spec)
    if not isinstance(x, np.ndarray):
        _fail(TypeError, f"x must be a numpy array of shape (T, B, {width}), got "
              f"{type(x).__name__}")
    if x.ndim != 3:
        _fail(ValueError, f"x must have shape (T, B, {width}) (time-major), got {x.shape}")
    if x.dtype != dtype:
        _fail(TypeError, f"x has dtype {x.dtype}, expected {dtype} (the parameters' dtype)")
    input_sizes = [size for _, size in spec["inputs"]]
    untold = {size for size in input_sizes if size not in sizes}
    if untold:
        (size,) = untold
        rest = x.shape[2] - sum(sizes[s] for s in input_sizes if s in sizes)
        if rest >= input_sizes.count(size) and rest % input_sizes.count(size) == 0:
            sizes[size] = rest // input_sizes.count(size)
    if any(size not in sizes for size in input_sizes) or input_width(spec, sizes) != x.shape[2]:
        told = " + ".join(f"{s}={sizes[s]}" if s in sizes else s for s in input_sizes)
        _fail(ValueError, f"x has shape {x.shape}, expected (T, B, {told})"
              + (f" (the inputs {[name for name, _ in spec['inputs']]} side by side)"
                 if len(input_sizes) > 1 else ""))
    T, B = x.shape[0], x.shape[1]
    if T < 1 or B < 1:
        _fail(ValueError, f"x has shape {x.shape}: T and B must be at least 1")
    _require_finite("x", x)
    return T, B


def _check_tokens(spec, sizes, dtype, x):
    """(T, B) of a token input, x: (T, B) integers in [0, vocab), the vocabulary size
    read off the embedding table (a kernel indexing past it would read other memory)."""
    ((_, V),) = spec["inputs"]
    if not isinstance(x, np.ndarray):
        _fail(TypeError, f"x must be a numpy array of shape (T, B) of integer tokens, got "
              f"{type(x).__name__}")
    if x.ndim != 2:
        _fail(ValueError, f"x must have shape (T, B) of integer tokens in [0, {V}) "
              f"(time-major), got {x.shape}")
    if not np.issubdtype(x.dtype, np.integer):
        _fail(TypeError, f"x must hold integer tokens in [0, {V}), got dtype {x.dtype}")
    T, B = x.shape
    if T < 1 or B < 1:
        _fail(ValueError, f"x has shape {x.shape}: T and B must be at least 1")
    if x.min() < 0 or x.max() >= sizes[V]:
        where = np.argwhere((x < 0) | (x >= sizes[V]))[0]
        _fail(ValueError, f"x contains token {x[tuple(where)]} at (t, b) = "
              f"{tuple(where.tolist())}, outside [0, {sizes[V]}) ({V} = {sizes[V]}, from "
              "the embedding's shape)")
    return T, B


def input_bytes(spec, sizes, itemsize):
    """Bytes of one (t, b) of the inputs as the kernels read them: a token is an int64;
    several inputs are read as copies of x's columns (twice x's width)."""
    if spec.get("tokens"):
        return 8
    return itemsize * input_width(spec, sizes) * (1 if len(spec["inputs"]) == 1 else 2)


def pack_inputs(spec, x):
    """x as one array: a dict {input: (T, B, size)} becomes the inputs side by side in
    the order the model declares them (a copy); an array is returned as it is."""
    if not isinstance(x, dict):
        return x
    names = [name for name, _ in spec["inputs"]]
    if sorted(x) != sorted(names):
        _fail(ValueError, f"x must have the keys {names} (the model's inputs), got "
              f"{list(x)}")
    for name in names:
        a = x[name]
        if not isinstance(a, np.ndarray) or a.ndim != 3:
            _fail(ValueError, f"x[{name!r}] must be a numpy array of shape (T, B, "
                  f"{dict(spec['inputs'])[name]}), got {_shape_of(a)}")
        if a.shape[:2] != x[names[0]].shape[:2] or a.dtype != x[names[0]].dtype:
            _fail(ValueError, f"x[{name!r}] has shape {a.shape} and dtype {a.dtype}; the "
                  f"inputs must share (T, B) and dtype, x[{names[0]!r}] has "
                  f"{x[names[0]].shape} and {x[names[0]].dtype}")
    return np.concatenate([x[name] for name in names], axis=2)


def input_rows(spec, x):
    """x as the kernels read it, one row per (t, b): (T*B,) int64 tokens or (T*B, width)."""
    if spec.get("tokens"):
        return np.ascontiguousarray(x.reshape(-1), dtype=np.int64)
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2])


def input_columns(spec, sizes, rows):
    """Each input's rows, contiguous, in the order declared: x's rows themselves for
    one input, copies of their columns for several."""
    if len(spec["inputs"]) == 1:
        return [rows]
    edges = np.cumsum([0] + [sizes[size] for _, size in spec["inputs"]])
    return [np.ascontiguousarray(rows[:, lo:hi]) for lo, hi in zip(edges, edges[1:])]


def _check_state0(spec, state0, B, sizes, dtype):
    if not isinstance(state0, dict):
        _fail(TypeError, f"state0 must be a dict {{state: (B, size) array}} with keys "
              f"{list(spec['states'])}, got {type(state0).__name__}")
    for name, size in spec["states"].items():
        if name not in state0:
            _fail(ValueError, f"state0 is missing the state {name!r} (expected keys "
                  f"{list(spec['states'])}; leave state0 out to start from zeros)")
        s = state0[name]
        if not isinstance(s, np.ndarray):
            _fail(TypeError, f"state0[{name!r}] must be a numpy array of shape (B, {size}) = "
                  f"{(B, sizes[size])}, got {type(s).__name__}")
        if s.shape != (B, sizes[size]):
            _fail(ValueError, f"state0[{name!r}] must have shape (B, {size}) = "
                  f"{(B, sizes[size])}, got {s.shape}")
        if s.dtype != dtype:
            _fail(TypeError, f"state0[{name!r}] has dtype {s.dtype}, expected {dtype}")
        _require_finite(f"state0[{name!r}]", s)
    extra = [k for k in state0 if k not in spec["states"]]
    if extra:
        _fail(ValueError, f"state0 has unknown states {extra}; expected keys "
              f"{list(spec['states'])}")


def _check_targets(spec, targets, T, B, O, dtype):
    if not isinstance(targets, np.ndarray):
        _fail(TypeError, f"targets must be a numpy array, got {type(targets).__name__}")
    if spec["target"] == "index":
        if targets.shape != (T, B):
            _fail(ValueError, f"targets must have shape (T, B) = {(T, B)} of class "
                  f"indices, got {targets.shape}")
        if not np.issubdtype(targets.dtype, np.integer):
            _fail(TypeError, f"targets must be integer class indices, got dtype "
                  f"{targets.dtype}")
        if targets.size and (targets.min() < 0 or targets.max() >= O):
            where = np.argwhere((targets < 0) | (targets >= O))[0]
            _fail(ValueError, f"targets contains class {targets[tuple(where)]} at (t, b) = "
                  f"{tuple(where.tolist())}, outside [0, {O}) ({spec['output'][1]} = {O} "
                  "output units)")
    else:
        if targets.shape != (T, B, O):
            _fail(ValueError, f"targets must have shape (T, B, {spec['output'][1]}) = "
                  f"{(T, B, O)}, got {targets.shape}")
        if targets.dtype != dtype:
            _fail(TypeError, f"targets has dtype {targets.dtype}, expected {dtype}")
        _require_finite("targets", targets)


def loss_weights(spec, T, B, mask, dtype, *, allow_empty=False):
    """(w_tb flat, total): the mask (ones by default), only the last step for a
    last-step loss. A total of 0 is refused unless ``allow_empty``: online RTRL carries
    the states over a stretch without loss terms, and a data-parallel shard may hold
    none."""
    w = np.ones((T, B), dtype) if mask is None else np.asarray(mask).astype(dtype)
    if spec["loss_at"] == "last":
        w = w.copy()
        w[:-1] = 0
    total = float(w.sum())
    if total <= 0 and not allow_empty:
        raise ValueError("mask selects no loss term (its sum is 0)")
    return np.ascontiguousarray(w.reshape(T * B)), total


# -- memory -------------------------------------------------------------------
def bytes_text(n):
    """A byte count as people read it: 1.50 MiB."""
    for unit, size in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def check_memory_limit(limit):
    """Refuse a memory_limit that is not a positive number of bytes (None: no limit)."""
    if limit is not None and not (isinstance(limit, (int, float, np.integer, np.floating))
                                  and limit > 0):
        raise ValueError(f"memory_limit must be a positive number of bytes, got {limit!r}")


# -- parameters -----------------------------------------------------------------
def init_params(spec, sizes, *, seed=0, dtype=np.float32):
    """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights, as PyTorch's RNNs; zero biases;
    gains (of a normalisation) one, as torch.nn.LayerNorm's."""
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be np.float32 or np.float64, got {dtype}")
    if isinstance(sizes, (tuple, list)):
        sizes = dict(zip(spec["sizes"], sizes))
    missing = [s for s in spec["sizes"] if s not in sizes]
    if missing:
        raise ValueError(f"sizes is missing {missing}; expected {spec['sizes']}")
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in spec["params"].items():
        dims = tuple(int(sizes[s]) for s in shape)
        role = spec["roles"][name]
        if role == "bias":
            params[name] = np.zeros(dims, dtype)
        elif role == "gain":
            params[name] = np.ones(dims, dtype)
        else:
            bound = 1.0 / math.sqrt(dims[-1] if role == "weight" else dims[0])
            params[name] = rng.uniform(-bound, bound, dims).astype(dtype)
    return params
