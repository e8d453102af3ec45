"""What every generated CUDA module shares at run time: products, reductions, moves.

The CUDA twin of calls.py, at the same place in the data flow (the end:
generated/<model>_cuda.py imports it; it imports nothing from derive/). The model-
specific kernels (fused elementwise blocks, the loss) are in the generated module;
here are the kernels every model needs, written once:

* ``gemm``: C[c0+i, j] (+)= sum_k op(A)[i, k] op(B)[k, j], op a transpose or not.
  TILE x TILE threads per block, one output element per thread; each block stages
  a TILE x TILE tile of op(A) and of op(B) in shared memory per step along k, read
  from global memory along the contiguous axis (coalesced) and stored with one
  column of padding (no bank conflicts on the transposed store). Row offsets a0,
  b0, c0 let a kernel read and write rows t*B .. t*B+B of a trajectory array in
  place: no slicing or copies per time step. Three uses:
  ``gemm_nt`` (forward products, hoisted over all T*B rows or one step),
  ``gemm_nn_add`` (adjoint of a product's source, accumulated),
  ``gemm_tn`` (weight gradients: a sum over all T*B rows of outer products).
* ``column_sums``: bias gradients and the loss, without atomics. Elementwise
  kernels write each row's contribution to its own element of a (T*B, n) array
  (each element has exactly one writer per launch, and launches on a stream run in
  order), then the rows are summed by a two-pass tree reduction: pass 1, a grid of
  (column tiles x row chunks) blocks, each thread summing a strided set of rows of
  one column, then a shared-memory tree over the TILE threads of that column; one
  thread writes the chunk's partial sum. Pass 2 reduces the partials the same way
  in one chunk. Every output has one writer and a fixed summation order, so the
  result is deterministic (the same bits on every run with the same settings).
* ``move``: zero, copy or add a range of rows (workspace set-up, truncated-BPTT
  windows, stacking weights), a grid-stride loop.
* ``gather`` and ``scatter_add``: an embedding lookup E[x] (the product E onehot(x_t)
  of a token input) without a product: the forward copies column x_t of the table,
  a thread per (row, unit); the table's gradient adds each row's adjoint into the
  column of its token, atomically (rows with one token add to the same elements).
  Atomic float sums are not in a fixed order: the gradient of a table is the one
  result whose bits may differ between runs.

Arguments may be NumPy arrays (copied to the device once per call) or CUDA device
arrays (used in place). ``configure`` changes tile and block sizes (the CUDA
simulator tests use small ones so that ragged tiles and several blocks are
exercised with tiny problems).
"""

import math

import numba
import numpy as np
from numba import cuda, njit

from . import calls, checkpoint, driver, kernel_functions, online, trainer

#: Tile edge of the matrix-product and reduction kernels (a power of two).
TILE = 16
#: Threads per block of the one-dimensional (elementwise) kernels.
BLOCK = 128
#: At most this many row chunks in pass 1 of a column sum.
CHUNKS = 64
#: At most this many blocks for the grid-stride ``move`` kernel.
MOVE_GRID = 1024
#: What a CUDA module computes: the reverse algorithms and checkpointed BPTT.
ALGORITHMS = calls.ALGORITHMS + ("checkpoint",)
BIDIRECTIONAL_ALGORITHMS = calls.BIDIRECTIONAL_ALGORITHMS


def configure(tile=None, block=None, chunks=None, move_grid=None):
    """Set launch sizes for all later launches (kernels are built per tile size)."""
    global TILE, BLOCK, CHUNKS, MOVE_GRID
    if tile is not None:
        if tile < 1 or tile & (tile - 1):
            raise ValueError(f"tile must be a power of two, got {tile}")
        TILE = int(tile)
    if block is not None:
        BLOCK = int(block)
    if chunks is not None:
        CHUNKS = int(chunks)
    if move_grid is not None:
        MOVE_GRID = int(move_grid)


# -- scalar functions the printed lines call ---------------------------------------
# kernel_functions' formulas themselves (the exact ones: a GPU evaluates tanh and exp
# in hardware), as plain @njit functions. The CPU modules call the same names, which
# kernel_functions overloads with float32 versions (numba.extending.overload); but
# neither an overload nor a cuda.jit(device=True) function compiles to PTX where no GPU
# is present (numba-cuda then asks the current device for its compute capability),
# while a plain @njit function does, inlined as a device function. Their constants
# take their argument's type, so a float32 kernel computes them in float32
# (tests/test_cuda.py fails on float64 arithmetic in a float32 kernel's PTX).
tanh, exp, sigmoid, softplus, relu, step = (
    njit(inline="always")(getattr(kernel_functions, name))
    for name in ("tanh", "exp", "sigmoid", "softplus", "relu", "step"))


# -- kernels ---------------------------------------------------------------------
_BUILT = {}


def kernels(dtype, tile=None):
    """The shared-memory kernels for one float dtype and tile size (built once).

    Shared arrays need their element type and shape at compile time, hence one
    set per (dtype, tile)."""
    tile = TILE if tile is None else tile
    key = (np.dtype(dtype).str, tile)
    if key not in _BUILT:
        _BUILT[key] = _build(numba.from_dtype(np.dtype(dtype)), tile)
    return _BUILT[key]


def _build(nbtype, TS):
    TS1 = TS + 1  # shapes of shared arrays must be literal constants
    @cuda.jit
    def gemm(A, a0, ta, Bm, b0, tb, C, c0, M, N, K, acc):
        """C[c0+i, j] (+)= sum_k op(A)[i, k] op(B)[k, j] for i < M, j < N, k < K.

        op(A)[i, k] = A[a0+k, i] if ta else A[a0+i, k]; op(B)[k, j] = B[b0+j, k]
        if tb else B[b0+k, j]."""
        sa = cuda.shared.array((TS, TS1), nbtype)  # sa[i, k] of this tile
        sb = cuda.shared.array((TS, TS1), nbtype)  # sb[k, j] of this tile
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        i0 = cuda.blockIdx.y * TS
        j0 = cuda.blockIdx.x * TS
        s = nbtype(0)
        for k0 in range(0, K, TS):
            # Stage both tiles; tx runs along each array's contiguous axis.
            if ta:
                i = i0 + tx
                k = k0 + ty
                if i < M and k < K:
                    sa[tx, ty] = A[a0 + k, i]
                else:
                    sa[tx, ty] = nbtype(0)
            else:
                i = i0 + ty
                k = k0 + tx
                if i < M and k < K:
                    sa[ty, tx] = A[a0 + i, k]
                else:
                    sa[ty, tx] = nbtype(0)
            if tb:
                j = j0 + ty
                k = k0 + tx
                if j < N and k < K:
                    sb[tx, ty] = Bm[b0 + j, k]
                else:
                    sb[tx, ty] = nbtype(0)
            else:
                k = k0 + ty
                j = j0 + tx
                if j < N and k < K:
                    sb[ty, tx] = Bm[b0 + k, j]
                else:
                    sb[ty, tx] = nbtype(0)
            cuda.syncthreads()
            # Zero padding makes the ragged last tile safe to sum in full.
            for kk in range(TS):
                s += sa[ty, kk] * sb[kk, tx]
            cuda.syncthreads()
        i = i0 + ty
        j = j0 + tx
        if i < M and j < N:
            if acc:
                C[c0 + i, j] += s
            else:
                C[c0 + i, j] = s

    @cuda.jit
    def colsum(A, a0, M, N, P):
        """P[chunk, j] = sum of A[a0 + r, j] over the rows r < M of this chunk."""
        acc = cuda.shared.array((TS, TS), nbtype)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        j = cuda.blockIdx.x * TS + tx
        s = nbtype(0)
        if j < N:
            # Rows chunk*TS + ty, then every TS*chunks rows: a fixed order.
            r = cuda.blockIdx.y * TS + ty
            stride = TS * cuda.gridDim.y
            while r < M:
                s += A[a0 + r, j]
                r += stride
        acc[ty, tx] = s
        cuda.syncthreads()
        # Tree over the TS threads of one column: each step halves the live rows.
        h = TS // 2
        while h > 0:
            if ty < h:
                acc[ty, tx] += acc[ty + h, tx]
            cuda.syncthreads()
            h //= 2
        if ty == 0 and j < N:
            P[cuda.blockIdx.y, j] = acc[0, tx]

    return {"gemm": gemm, "colsum": colsum}


@cuda.jit
def move(dst, d0, src, s0, rows, op):
    """Rows d0 .. d0+rows of dst: op 0 zero, 1 = src rows s0.., 2 += src rows s0..
    (all of dst's columns; a grid-stride loop)."""
    n = dst.shape[1]
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < rows * n:
        r = i // n
        k = i - r * n
        if op == 0:
            dst[d0 + r, k] = 0
        elif op == 1:
            dst[d0 + r, k] = src[s0 + r, k]
        else:
            dst[d0 + r, k] += src[s0 + r, k]
        i += stride


@cuda.jit
def columns(dst, src, c0):
    """dst[r, k] = src[r, c0 + k] for all of dst: an input's columns of x."""
    n = dst.shape[1]
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < dst.shape[0] * n:
        r = i // n
        k = i - r * n
        dst[r, k] = src[r, c0 + k]
        i += stride


@cuda.jit
def gather(x, x0, W, C, c0, rows, n):
    """C[c0+r, k] = W[k, x[x0+r]] for r < rows, k < n: column x_t of a table."""
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < rows * n:
        r = i // n
        k = i - r * n
        C[c0 + r, k] = W[k, x[x0 + r]]
        i += stride


@cuda.jit
def scatter_add(A, x, C, rows, n):
    """C[k, x[r]] += A[r, k] for r < rows, k < n: a lookup's table gradient."""
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < rows * n:
        r = i // n
        k = i - r * n
        cuda.atomic.add(C, (k, x[r]), A[r, k])
        i += stride


def ptx_kernels(dtype):
    """(name, Python function, argument kinds) of every kernel here for one float
    dtype, for tests that compile them to PTX. Kinds: "i" int64, "m" 2-D array."""
    k = kernels(dtype)
    return [
        ("gemm", k["gemm"].py_func, "miimiimiiiii"),
        ("colsum", k["colsum"].py_func, "miiim"),
        ("move", move.py_func, "mimiii"),
        ("columns", columns.py_func, "mmi"),
        ("gather", gather.py_func, "timmiii"),
        ("scatter_add", scatter_add.py_func, "mtmii"),
    ]


# -- host side: launches ---------------------------------------------------------
def launch(kernel, n):
    """A one-dimensional launch over n threads, BLOCK per block."""
    return kernel[max(1, -(-n // BLOCK)), BLOCK]


def _gemm(A, a0, ta, Bm, b0, tb, C, c0, M, N, K, acc):
    if M <= 0 or N <= 0:
        return
    grid = (-(-N // TILE), -(-M // TILE))
    kernels(C.dtype)["gemm"][grid, (TILE, TILE)](A, a0, ta, Bm, b0, tb, C, c0, M, N, K, acc)


def gemm_nt(A, a0, W, C, c0, M, N, K):
    """C[c0:c0+M] = A[a0:a0+M] @ W.T, W (N, K): a product z = W v for M rows."""
    _gemm(A, a0, 0, W, 0, 1, C, c0, M, N, K, 0)


def gemm_nn_add(A, a0, W, C, c0, M, N, K):
    """C[c0:c0+M] += A[a0:a0+M] @ W, W (K, N): the adjoint W^T z_bar, accumulated."""
    _gemm(A, a0, 0, W, 0, 0, C, c0, M, N, K, 1)


def lookup(x, x0, W, C, c0, M, N):
    """C[c0:c0+M] = W[:, x[x0:x0+M]].T, W (N, V): the lookups E[x] of M rows."""
    if M > 0:
        launch(gather, M * N)(x, x0, W, C, c0, M, N)


def lookup_gradient_add(A, x, C, M):
    """C[:, x[r]] += A[r] for the first M rows: the lookups' sum of outer products
    A^T onehot(x), C (N, V)."""
    if M > 0:
        launch(scatter_add, M * C.shape[0])(A, x, C, M, C.shape[0])


def gemm_tn(A, a0, Bm, b0, M, N, K):
    """A[a0:a0+K].T @ Bm[b0:b0+K], a new (M, N) array: sum over K rows of outer
    products (a weight gradient over all steps)."""
    C = cuda.device_array((M, N), A.dtype)
    if K <= 0:
        zero(C)
        return C
    _gemm(A, a0, 1, Bm, b0, 0, C, 0, M, N, K, 0)
    return C


def column_sums(A, a0=0, rows=None):
    """Sums over rows a0 .. a0+rows of A (default all), a new 1-D device array."""
    rows = A.shape[0] - a0 if rows is None else rows
    N = A.shape[1]
    k = kernels(A.dtype)
    chunks = max(1, min(CHUNKS, -(-rows // TILE)))
    grid_x = max(1, -(-N // TILE))
    partial = cuda.device_array((chunks, N), A.dtype)
    k["colsum"][(grid_x, chunks), (TILE, TILE)](A, a0, rows, N, partial)
    if chunks > 1:
        out = cuda.device_array((1, N), A.dtype)
        k["colsum"][(grid_x, 1), (TILE, TILE)](partial, 0, chunks, N, out)
        partial = out
    return partial.reshape(N)


def total(A):
    """Sum of all elements of a (rows, 1) device array, as a Python float."""
    return float(column_sums(A).copy_to_host()[0])


def _strided(kernel, n):
    """A launch of a grid-stride kernel over n elements (at most MOVE_GRID blocks)."""
    return kernel[max(1, min(MOVE_GRID, -(-n // BLOCK))), BLOCK]


def _move(dst, d0, src, s0, rows, op):
    n = rows * dst.shape[1]
    if n > 0:
        _strided(move, n)(dst, d0, src, s0, rows, op)


def zero(a, lo=0, hi=None):
    """Zero rows lo .. hi of a 2-D device array."""
    hi = a.shape[0] if hi is None else hi
    _move(a, lo, a, lo, hi - lo, 0)


def copy_rows(dst, d0, src, s0, rows):
    _move(dst, d0, src, s0, rows, 1)


def add_rows(dst, d0, src, s0, rows):
    _move(dst, d0, src, s0, rows, 2)


def empty(shape, dtype):
    return cuda.device_array(shape, dtype)


def zeros(shape, dtype):
    a = cuda.device_array(shape, dtype)
    zero(a if a.ndim == 2 else a.reshape(a.shape[0], -1))
    return a


def stack_rows(arrays):
    """Device arrays (rows_i, n) stacked into one (sum rows_i, n): a product group's
    weights (the four LSTM gate matrices become one GEMM operand)."""
    if len(arrays) == 1:
        return arrays[0]
    out = cuda.device_array((sum(a.shape[0] for a in arrays), arrays[0].shape[1]),
                            arrays[0].dtype)
    row = 0
    for a in arrays:
        copy_rows(out, row, a, 0, a.shape[0])
        row += a.shape[0]
    return out


def input_columns(spec, sizes, rows):
    """Each input's rows on the device, in the order declared (calls.input_columns):
    x's rows themselves for one input, new arrays of their columns for several."""
    if len(spec["inputs"]) == 1:
        return [rows]
    out, c0 = [], 0
    for _, size in spec["inputs"]:
        dst = cuda.device_array((rows.shape[0], sizes[size]), rows.dtype)
        if dst.size > 0:
            _strided(columns, dst.size)(dst, rows, c0)
        out.append(dst)
        c0 += sizes[size]
    return out


def take_rows(src, s0, rows):
    """A new device array holding rows s0 .. s0+rows of src."""
    out = cuda.device_array((rows, src.shape[1]), src.dtype)
    copy_rows(out, 0, src, s0, rows)
    return out


# -- host side: arguments ----------------------------------------------------------
def is_device_array(a):
    """A Numba device array, or any object with the CUDA array interface (CuPy,
    PyTorch); Numba's simulator arrays count too."""
    return cuda.devicearray.is_cuda_ndarray(a) or hasattr(a, "__cuda_array_interface__")


def to_device(a):
    """A C-contiguous Numba device array of a (no copy if it already is one)."""
    if cuda.devicearray.is_cuda_ndarray(a):
        d = a
    elif hasattr(a, "__cuda_array_interface__") and hasattr(cuda, "as_cuda_array"):
        d = cuda.as_cuda_array(a)
    else:
        return cuda.to_device(np.ascontiguousarray(a))
    if not d.is_c_contiguous():
        raise ValueError(f"device arrays must be C-contiguous, got shape {d.shape} "
                         "with other strides (copy it first)")
    return d


def _standin(a):
    """A zero-memory NumPy array with a device array's shape and dtype, so that
    calls.check_call checks shapes and dtypes; the values (NaN, Inf, class
    range) stay unchecked on the device: checking them would cost a copy."""
    if is_device_array(a):
        d = to_device(a)
        return np.broadcast_to(np.zeros((), d.dtype), d.shape)
    return a


def check_arguments(spec, params, x, targets=None, state0=None, mask=None, l2=None):
    """calls.check_call on the arguments, device arrays by their stand-ins (nothing is
    copied; a mask is a host array): (sizes, T, B, dtype)."""
    if isinstance(params, dict):
        params = {k: _standin(v) for k, v in params.items()}
    if isinstance(state0, dict):
        state0 = {k: _standin(v) for k, v in state0.items()}
    return calls.check_call(spec, params, _standin(x),
                            None if targets is None else _standin(targets), state0, mask,
                            l2=l2)


def _tokens_to_device(x):
    """Integer tokens as the kernels read them, int64 on the device."""
    if is_device_array(x):
        x = to_device(x)
        return x if x.dtype == np.int64 else cuda.to_device(x.copy_to_host().astype(np.int64))
    return cuda.to_device(np.ascontiguousarray(x, np.int64))


class Call:
    """The arguments of one call, checked and on the device.

    ``on_device``: the parameters were device arrays; results are then device
    arrays too, NumPy arrays otherwise."""

    def __init__(self, spec, params, x, targets=None, state0=None, mask=None):
        if mask is not None and is_device_array(mask):
            mask = to_device(mask).copy_to_host()
        x = calls.pack_inputs(spec, x)  # a dict of host arrays, side by side
        self.sizes, self.T, self.B, self.dtype = check_arguments(spec, params, x, targets,
                                                                 state0, mask)
        self.on_device = is_device_array(next(iter(params.values())))
        self.params = {k: to_device(v) for k, v in params.items()}
        self.x = _tokens_to_device(x) if spec.get("tokens") else to_device(x)
        self.state0 = None if state0 is None else {k: to_device(v) for k, v in state0.items()}
        self.mask = mask
        TB = self.T * self.B
        if targets is None:
            self.targets = None
        elif spec["target"] == "index":
            if is_device_array(targets):
                self.targets = to_device(targets).reshape(TB)
            else:
                self.targets = cuda.to_device(np.ascontiguousarray(targets.reshape(TB),
                                                                   np.int64))
        else:
            self.targets = to_device(targets).reshape(TB, targets.shape[2])

    def weights(self, spec):
        """Per-row loss weights on the device and their sum (calls.loss_weights)."""
        w, total_weight = calls.loss_weights(spec, self.T, self.B, self.mask, self.dtype)
        return cuda.to_device(w), total_weight

    def output(self, a):
        """A result array as the caller gets it: on the device or copied to NumPy."""
        return a if self.on_device else a.copy_to_host()


def backward_windows(loop, ws, T, B, plan, local):
    """calls.backward_windows on the device: run ``loop(ws, t_hi, t_lo)`` over each
    window of ``plan`` (None: one full sweep on ws itself). ``local`` lists (array,
    rows are (T+1)*B, accumulated over windows) for adjoints private to a window."""
    if plan is None:
        loop(ws, T - 1, 0)
        return
    win = {name: zeros(ws[name].shape, ws[name].dtype) for name, _, _ in local}
    acc = {name: zeros(ws[name].shape, ws[name].dtype) for name, _, keep in local if keep}
    view = dict(ws, **win)
    for end, start, first in plan.tolist():
        for name, shifted, _ in local:
            s = B if shifted else 0
            zero(win[name], start * B, (end + 1) * B + s)
            copy_rows(win[name], first * B + s, ws[name], first * B + s, (end + 1 - first) * B)
        loop(view, end, start)
        for name, a in acc.items():
            add_rows(a, start * B, win[name], start * B, (end + 1 - start) * B)
    for name, a in acc.items():
        ws[name] = a


def reverse_windows(loop, ws, T, B, plan, local):
    """calls.reverse_windows on the device: the reverse states' backward ``loop(ws,
    t_lo, t_hi)`` over each window of ``plan`` mirrored, from its first loss step up
    to T-1 (None: one full sweep on ws itself)."""
    if plan is None:
        loop(ws, 0, T - 1)
        return
    win = {name: zeros(ws[name].shape, ws[name].dtype) for name, _, _ in local}
    acc = {name: zeros(ws[name].shape, ws[name].dtype) for name, _, keep in local if keep}
    view = dict(ws, **win)
    for end, _, first in plan.tolist():
        for name, _, _ in local:
            zero(win[name], first * B, win[name].shape[0])
            copy_rows(win[name], first * B, ws[name], first * B, (end + 1 - first) * B)
        loop(view, first, T - 1)
        for name, a in acc.items():
            add_rows(a, first * B, win[name], first * B, a.shape[0] - first * B)
    for name, a in acc.items():
        ws[name] = a


# -- the driver ------------------------------------------------------------------
class Model:
    """The driver of one generated CUDA module, the twin of runtime.Model: what a call
    does the same way for every model (arguments to the device, workspace, backward
    windows, gradients, L2). The module's loss_and_grads, forward and init_params are
    its methods; its arguments are the module's layout:

    name, spec    the module's NAME and SPEC
    shapes        shapes(T, B, *sizes in SPEC order) -> {device work array: shape}
    zeros         the work arrays that start zeroed (the rest are written first)
    phases        {"forward" | "backward": (pre, loop, post) host functions}: each
                  launches its phase's kernels on a workspace; a backward loop
                  takes (ws, t_hi, t_lo)
    loss_rows     the loss kernel: one thread per row; l2_kernel: the L2 kernel
    inputs, output, states, adjoints, vectors, window_local: as runtime.Model's
                  (vectors: each vector parameter's per-row gradient, summed after the
                  sweep)
    groups        ((stacked weights, the product's adjoint, its source, the source is
                  a state read at t (rows shifted by B), an embedding lookup (gathered,
                  its gradient scatter-added), member weights), ...)
    """

    def __init__(self, name, spec, shapes, *, zeros, phases, loss_rows, l2_kernel, inputs,
                 output, states, adjoints, vectors, groups, window_local, reverse=None):
        self.name, self.spec, self.shapes, self.zeros = name, spec, shapes, zeros
        self.phases, self.loss_rows, self.l2_kernel = phases, loss_rows, l2_kernel
        self.inputs, self.output, self.states, self.vectors = inputs, output, states, vectors
        self.adjoints = adjoints
        self.groups, self.window_local = groups, window_local
        self.reverse = reverse  # the reverse states' backward loop, or None
        self._reverse = frozenset(spec.get("reverse", ()))
        self._sizes = spec["sizes"]

    def init_params(self, sizes, *, seed=0, dtype=np.float32):
        """Parameters for sizes {name: int} (or a tuple in SIZES order): weights uniform
        in +-1/sqrt(fan_in), biases zero. NumPy arrays (to_device moves them)."""
        return calls.init_params(self.spec, sizes, seed=seed, dtype=dtype)

    def workspace(self, call, T=None):
        """Device arrays of one call: trajectory, adjoints, per-row bias gradients; of T
        steps (default the call's), the input x then set by the caller."""
        T, B = (call.T if T is None else T), call.B
        dims = [call.sizes[s] for s in self.spec["sizes"]]
        TB = T * B
        ws = dict(T=T, B=B, TB=TB, **dict(zip(self.spec["sizes"], dims)))
        if T == call.T:
            ws.update(zip(self.inputs, input_columns(
                self.spec, call.sizes, call.x.reshape((TB,) + call.x.shape[2:]))))
        for stacked, _, _, _, _, weights in self.groups:
            ws[stacked] = stack_rows([call.params[w] for w in weights])
        for p in self.vectors:
            ws[p] = call.params[p]
        for name, shape in self.shapes(T, B, *dims).items():
            ws[name] = (zeros if name in self.zeros else empty)(shape, call.dtype)
        for s, array in self.states.items():
            # a reverse state's initial value is its value at t = T, after the last row
            row = TB if s in self._reverse else 0
            if call.state0 is not None:
                copy_rows(ws[array], row, call.state0[s], 0, B)
            else:
                zero(ws[array], row, row + B)
        return ws

    def _segment_view(self, ws, steps):
        """The workspace of a segment shorter than ws's: each work array's first rows
        (contiguous device views), T and TB set to match (checkpoint.segment_view)."""
        B = ws["B"]
        dims = [ws[s] for s in self.spec["sizes"]]
        view = dict(ws, T=steps, TB=steps * B)
        for name, shape in self.shapes(steps, B, *dims).items():
            view[name] = ws[name][:shape[0]]
        return view

    def _run(self, direction, ws):
        for phase in self.phases[direction]:
            phase(ws)

    def _loss(self, ws, targets, weights, scale):
        """Predictions y (T*B, O) and the per-row weighted losses, on the device."""
        TB, O = ws["TB"], ws[self.spec["output"][1]]
        dtype = ws[self.output[0]].dtype  # the input may be integer tokens
        y = empty((TB, O), dtype)
        loss_rows = empty((TB, 1), dtype)
        launch(self.loss_rows, TB)(TB, O, ws[self.output[0]], targets, weights, scale, y,
                                   ws[self.output[1]], loss_rows)
        return y, loss_rows

    def forward(self, params, x, state0=None):
        """Predictions y (T, B, output size) and the final states {name: (B, size)}."""
        call = Call(self.spec, params, x, state0=state0)
        T, B, O = call.T, call.B, call.sizes[self.spec["output"][1]]
        ws = self.workspace(call)
        self._run("forward", ws)
        index = self.spec["target"] == "index"
        targets = cuda.to_device(np.zeros((T * B,) if index else (T * B, O),
                                          np.int64 if index else call.dtype))
        y, _ = self._loss(ws, targets, zeros((T * B, 1), call.dtype).reshape(T * B), 0.0)
        # each state at the end of its run: t = T-1, or t = 0 for a reverse state
        final = {s: call.output(take_rows(ws[array], 0 if s in self._reverse else T * B, B))
                 for s, array in self.states.items()}
        return call.output(y.reshape(T, B, y.shape[1])), final

    def loss(self, params, x, targets, *, state0=None, mask=None, l2=0.0, memory_limit=None):
        """The loss of loss_and_grads (its arguments, weights and L2) without the
        gradients: the forward and the loss kernel only. memory_limit (bytes of device
        memory): a call that would allocate more is refused (the CPU module's loss()
        runs such a sequence in stretches)."""
        if memory_limit is not None:  # refused before anything is copied or allocated
            calls.check_memory_limit(memory_limit)
            if mask is not None and is_device_array(mask):
                mask = to_device(mask).copy_to_host()
            sizes, T, B, dtype = check_arguments(self.spec, params, x, targets, state0, mask)
            need = self.memory(sizes, T, B, dtype)
            if need > memory_limit:
                raise ValueError(f"loss() on {self.name} with T={T}, B={B} needs about "
                                 f"{calls.bytes_text(need)} of device memory, more than "
                                 f"memory_limit={calls.bytes_text(int(memory_limit))}; the "
                                 "CPU module's loss() runs the sequence in stretches")
        call = Call(self.spec, params, x, targets, state0, mask)
        weights, total_weight = call.weights(self.spec)
        ws = self.workspace(call)
        self._run("forward", ws)
        _, loss_rows = self._loss(ws, call.targets, weights, 0.0)
        return self._with_l2(call, total(loss_rows) / total_weight, None, l2)

    def loss_and_grads(self, params, x, targets, *, state0=None, algorithm="bptt", k1=None,
                       k2=None, mask=None, l2=0.0, memory_limit=None, snapshots=None,
                       segment=None):
        """Loss sum_tb w l / sum_tb w (+ l2/2 sum ||W||^2) and its gradients, keyed like
        params.

        x: (T, B, input size), several inputs side by side (or a dict of host arrays);
        targets: (T, B) integer classes or (T, B, output size)
        floats, as SPEC["target"] says; state0: {state: (B, size)}; algorithm: "bptt"
        (accumulated, O(T)), "naive" (O(T^2)), "tbptt" (k1, k2: every k1 steps
        backpropagate over the last k2; returns the sum of the truncated gradients),
        "epochwise" (full BPTT over the sequence, seed 001), "checkpoint" (bptt's
        gradient in bounded device memory: segments of ``segment`` steps recomputed from
        ``snapshots`` kept states, or the fastest plan within memory_limit; host x,
        targets, mask may be any arrays read by slices x[a:b], such as np.memmap; see
        checkpoint.py). memory_limit (bytes of device memory): every algorithm refuses
        a call that would allocate more (memory() says how much), naming the
        checkpointed plan that fits. Gradients are device arrays if the parameters
        are, NumPy arrays otherwise.
        """
        online.check_options(algorithm, k1=k1, k2=k2, memory_limit=memory_limit,
                             snapshots=snapshots, segment=segment)
        calls.check_direction(self.name, self.spec, algorithm)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm {algorithm!r} has no CUDA version; choose one of "
                             f"{ALGORITHMS} (or the CPU module)")
        if algorithm == "checkpoint":
            return self._checkpointed(params, x, targets, state0, mask, l2, memory_limit,
                                      snapshots, segment)
        if memory_limit is not None:  # refused before anything is copied or allocated
            if mask is not None and is_device_array(mask):
                mask = to_device(mask).copy_to_host()
            sizes, T, B, dtype = check_arguments(self.spec, params, x, targets, state0, mask)
            self._check_memory(algorithm, sizes, T, B, dtype, memory_limit)
        call = Call(self.spec, params, x, targets, state0, mask)
        T, B = call.T, call.B
        plan = calls.windows(algorithm, T, k1, k2)
        weights, total_weight = call.weights(self.spec)
        ws = self.workspace(call)
        self._run("forward", ws)
        _, loss_rows = self._loss(ws, call.targets, weights, 1.0 / total_weight)
        loss = total(loss_rows) / total_weight
        post, loop, pre = self.phases["backward"]
        post(ws)
        backward_windows(loop, ws, T, B, plan, self.window_local)
        if self.reverse is not None:
            reverse_windows(self.reverse, ws, T, B, plan, self.window_local)
        pre(ws)
        return self._results(call, loss, self._gradient_terms(ws), l2)

    def _gradient_terms(self, ws):
        """New device arrays: each group's stacked weight gradient (one product over the
        workspace's T*B rows) and each vector parameter's (its rows summed)."""
        TB, B = ws["TB"], ws["B"]
        terms = {}
        for stacked, adjoint, source, shifted, lookup_group, _ in self.groups:
            rows, K = ws[stacked].shape
            if lookup_group:
                terms[stacked] = zeros((rows, K), ws[adjoint].dtype)
                lookup_gradient_add(ws[adjoint], ws[source], terms[stacked], TB)
                continue
            terms[stacked] = gemm_tn(ws[adjoint], 0, ws[source], B if shifted else 0, rows,
                                     K, TB)
        for p, rows in self.vectors.items():
            terms[p] = column_sums(ws[rows])
        return terms

    def _results(self, call, loss, terms, l2):
        """(loss, gradients keyed like params) from _gradient_terms' arrays, with L2."""
        grads = {}
        for stacked, w, lo, hi, first in calls.stacked_rows(
                [(g[0], g[-1]) for g in self.groups], lambda w: call.params[w].shape[0]):
            grads[w] = terms[stacked][lo:hi] if first else grads[w] + terms[stacked][lo:hi]
        for p in self.vectors:
            grads[p] = terms[p]
        loss = self._with_l2(call, loss, grads, l2)
        return loss, {name: call.output(grads[name]) for name in self.spec["params"]}

    def _with_l2(self, call, loss, grads, l2):
        """The loss with l2/2 sum ||W||^2 added, and l2 W added to each weight's device
        gradient in ``grads`` (None: the loss alone, the kernel's gradient discarded)."""
        if l2:
            for name, role in self.spec["roles"].items():
                if role == "weight":
                    w = call.params[name]
                    g = grads[name] if grads is not None else zeros(w.shape, call.dtype)
                    penalty_rows = empty((w.shape[0] * w.shape[1], 1), call.dtype)
                    launch(self.l2_kernel, w.shape[0] * w.shape[1])(w, g, penalty_rows,
                                                                    w.shape[1], float(l2))
                    loss += total(penalty_rows)
        return float(loss)

    # -- memory: runtime.Model's accounting over this module's device arrays -----------
    def _call_bytes(self, sizes, T, B, itemsize):
        """Device bytes one call of T steps allocates: its work arrays, the stacked
        weights, the gradients, predictions, per-row losses, loss weights and targets."""
        dims = tuple(sizes[s] for s in self._sizes)
        arrays = sum(math.prod(shape) for shape in self.shapes(T, B, *dims).values())
        params = sum(math.prod(sizes[d] for d in shape)
                     for shape in self.spec["params"].values())
        O = sizes[self.spec["output"][1]]
        per_row = O + 3 + (1 if self.spec["target"] == "index" else O)
        return itemsize * (arrays + 3 * params + T * B * per_row)

    def memory(self, sizes, T, B, dtype=np.float32, algorithm="bptt", *, snapshots=None,
               segment=None, memory_limit=None):
        """Bytes of device memory a loss_and_grads call of T steps and B sequences will
        allocate, before it runs (the arguments' own arrays not counted); for
        "checkpoint", the plan's (runtime.Model.memory)."""
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm {algorithm!r} has no CUDA version; choose one of "
                             f"{ALGORITHMS}")
        return driver.Model.memory(self, sizes, T, B, dtype, algorithm, snapshots=snapshots,
                                   segment=segment, memory_limit=memory_limit)

    _check_memory = driver.Model._check_memory
    _checkpoint_plan = driver.Model._checkpoint_plan

    def _checkpointed(self, params, x, targets, state0, mask, l2, memory_limit, snapshots,
                      segment):
        """Checkpointed BPTT on the device along checkpoint.walk: one workspace of L
        steps (a shorter last segment uses views of its first rows), states and
        adjoints as device arrays (B, size). Host x, targets and mask are read and
        checked one segment at a time, and copied to the device per segment."""
        if targets is None:
            raise TypeError("loss_and_grads needs targets; use forward(params, x) for "
                            "predictions")
        if mask is not None and is_device_array(mask):
            mask = to_device(mask).copy_to_host()
        x = calls.pack_inputs(self.spec, x)
        T = checkpoint.check_sequence(self.spec, x, targets, mask)

        def host(a):  # a slice as check_arguments takes it: host or device array
            return a if is_device_array(a) else np.asarray(a)

        first = [host(a[:min(T, 1)]) for a in (x, targets)]
        first.append(None if mask is None else np.asarray(mask[:min(T, 1)]))
        sizes, _, B, dtype = check_arguments(self.spec, params, first[0], first[1], state0,
                                             first[2], l2=l2)
        checkpoint.check_options(memory_limit, snapshots, segment)
        # refused before anything is copied to the device or allocated there
        chosen = self._checkpoint_plan(sizes, T, B, np.dtype(dtype).itemsize, memory_limit,
                                       snapshots, segment)
        call = Call(self.spec, params, first[0], first[1], state0, first[2])
        L = chosen.segment
        index = self.spec["target"] == "index"
        # one row of the input: (I,) floats, or a token (an int64)
        tokens = self.spec.get("tokens")
        I, O = (() if tokens else tuple(x.shape[2:])), sizes[self.spec["output"][1]]
        weights, total_weight = checkpoint.segment_weights(self.spec, T, B, mask, dtype)
        ws = self.workspace(call, L)
        views = {L: ws}
        xbuf = None if is_device_array(x) else empty((L * B,) + I,
                                                     np.int64 if tokens else dtype)

        def load(i, state):
            """The workspace of segment i, its input and entering state set, and its
            targets on the device."""
            lo, hi = i * L, min(T, (i + 1) * L)
            rows = (hi - lo) * B
            seg = views.get(hi - lo)
            if seg is None:
                seg = views[hi - lo] = self._segment_view(ws, hi - lo)
            xs, ts = x[lo:hi], targets[lo:hi]
            calls.check_data(self.spec, sizes, dtype, _standin(host(xs)), _standin(host(ts)),
                             None, None if mask is None else np.asarray(mask[lo:hi]))
            if xbuf is None:
                xs = to_device(xs).reshape((rows,) + I)
            else:
                xbuf[:rows].copy_to_device(np.ascontiguousarray(
                    np.asarray(xs).reshape((rows,) + I), xbuf.dtype))
                xs = xbuf[:rows]
            seg.update(zip(self.inputs, input_columns(self.spec, sizes, xs)))
            if is_device_array(ts):
                ts = to_device(ts).reshape((rows,) if index else (rows, O))
            else:
                ts = cuda.to_device(np.ascontiguousarray(
                    np.asarray(ts).reshape((rows,) if index else (rows, O)),
                    np.int64 if index else dtype))
            for s, array in self.states.items():
                copy_rows(seg[array], 0, state[s], 0, B)
            return seg, lo, hi, ts

        def advance(a, m, state):
            pre, loop, _ = self.phases["forward"]  # the states: no readout
            for i in range(a, m):
                seg, lo, hi, _ = load(i, state)
                pre(seg)
                loop(seg)
                state = {s: take_rows(seg[array], (hi - lo) * B, B)
                         for s, array in self.states.items()}
            return state

        # Sums over the segments, on the device (no copy to the host per segment): the
        # stacked weight gradients (each segment's product added), the weighted losses
        # per row, and the vector parameters' per-row gradients, which the kernels add
        # to (+=) and are summed over rows once, at the end.
        sums = {stacked: zeros(ws[stacked].shape, dtype) for stacked, *_ in self.groups}
        loss_sum = zeros((L * B, 1), dtype)
        per_segment = [name for name in self.zeros if name not in self.vectors.values()]

        def sweep(i, state, delta):
            seg, lo, hi, ts = load(i, state)
            steps = hi - lo
            for name in per_segment:
                zero(seg[name])
            self._run("forward", seg)
            _, loss_rows = self._loss(seg, ts, cuda.to_device(weights(lo, hi)),
                                      1.0 / total_weight)
            add_rows(loss_sum, 0, loss_rows, 0, steps * B)
            post, loop, pre = self.phases["backward"]
            post(seg)  # writes the last rows of the state adjoints first: add after it
            for s, array in self.adjoints.items():
                if array is not None and delta is not None:
                    add_rows(seg[array], steps * B, delta[s], 0, B)
            loop(seg, steps - 1, 0)
            pre(seg)
            for stacked, adjoint, source, shifted, lookup_group, _ in self.groups:
                rows, K = sums[stacked].shape
                if lookup_group:
                    lookup_gradient_add(seg[adjoint], seg[source], sums[stacked], steps * B)
                    continue
                _gemm(seg[adjoint], 0, 1, seg[source], B if shifted else 0, 0, sums[stacked],
                      0, rows, K, steps * B, 1)
            delta = {s: None if array is None else take_rows(seg[array], 0, B)
                     for s, array in self.adjoints.items()}
            return 0.0, None, delta  # the loss and gradients are summed above

        start = {s: (call.state0[s] if call.state0 is not None else
                     zeros((B, sizes[size]), dtype))
                 for s, size in self.spec["states"].items()}
        checkpoint.walk(chosen, start, advance, sweep, lambda total, terms: None)
        for p, rows in self.vectors.items():
            sums[p] = column_sums(ws[rows])
        return self._results(call, total(loss_sum) / total_weight, sums, l2)


# -- training ----------------------------------------------------------------------
class Trainer(trainer.Trainer):
    """runtime.trainer.Trainer around a CUDA module.

    The optimizer, clipping, fit() and save/load are the CPU Trainer's: parameters
    and optimizer slots stay NumPy arrays on the host, and each step's loss and
    gradients are computed on the device (parameters and the minibatch copied in,
    gradients copied out: a few arrays per step, never one per time step).
    """


def device_name():
    """The current GPU's name ("CUDA simulator" under NUMBA_ENABLE_CUDASIM=1), or
    None where no GPU is usable."""
    try:
        if not cuda.is_available():
            return None
        if numba.config.ENABLE_CUDASIM:
            return "CUDA simulator"
        name = cuda.get_current_device().name
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - any driver error means "no usable GPU"
        return None
