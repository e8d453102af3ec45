"""What every generated module shares at run time (NumPy and Numba only).

Generated modules hold the model-specific kernels; this module holds what is the
same for every model: scalar functions the printer calls, input checks, the
schedule of backward windows for each algorithm, parameter initialisation, the
optimizers and the Trainer. It sits at the end of the data flow and imports
nothing from derive/, so a generated trainer runs without SymPy.
"""

import math

import numpy as np
from numba import njit

_SCALAR = dict(cache=True, inline="always")


@njit(**_SCALAR)
def sigmoid(x):
    # Two branches keep exp's argument <= 0: no overflow for large |x|.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@njit(**_SCALAR)
def softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


@njit(**_SCALAR)
def relu(x):
    return max(x, 0.0)


@njit(**_SCALAR)
def step(x):
    return 1.0 if x > 0 else 0.0


ALGORITHMS = ("bptt", "naive", "tbptt", "epochwise")


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

    ``local`` lists (array name, rows are (T+1)*B, accumulate over windows) for the
    adjoints private to a window. With ``plan`` None (full BPTT) the kernel runs
    once on the workspace itself: no copies.
    """
    if plan is None:
        kernel(T - 1, 0, *[ws[a] for a in args])
        return
    win = {name: np.zeros_like(ws[name]) for name, _, _ in local}
    total = {name: np.zeros_like(ws[name]) for name, _, acc in local if acc}
    call = [win.get(a, ws.get(a)) for a in args]
    for end, start, first in plan:
        for name, shifted, _ in local:
            a, s = win[name], B if shifted else 0
            a[start * B:(end + 1) * B + s] = 0
            a[first * B + s:(end + 1) * B + s] = ws[name][first * B + s:(end + 1) * B + s]
        kernel(end, start, *call)
        for name, arr in total.items():
            arr[start * B:(end + 1) * B] += win[name][start * B:(end + 1) * B]
    for name, arr in total.items():
        ws[name][...] = arr


# -- checks -------------------------------------------------------------------
def _fail(kind, message):
    raise kind(message)


def check_call(spec, params, x, targets=None, state0=None, mask=None):
    """Validate a call before any kernel runs; return (sizes, T, B, dtype).

    Every message names the argument, the expected and the actual shape/dtype.
    """
    if not isinstance(params, dict):
        _fail(TypeError, f"params must be a dict of arrays, got {type(params).__name__}")
    missing = [p for p in spec["params"] if p not in params]
    if missing:
        _fail(ValueError, f"params is missing {missing}; expected keys {list(spec['params'])}")
    extra = [p for p in params if p not in spec["params"]]
    if extra:
        _fail(ValueError, f"params has unknown keys {extra}")
    first = params[next(iter(spec["params"]))]
    dtype = getattr(first, "dtype", None)
    if dtype not in (np.float32, np.float64):
        _fail(TypeError, f"params must be float32 or float64 arrays, got dtype {dtype}")
    sizes = {}
    for name, shape in spec["params"].items():
        p = params[name]
        if not isinstance(p, np.ndarray):
            _fail(TypeError, f"params[{name!r}] must be a numpy array, got {type(p).__name__}")
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
        if not np.all(np.isfinite(p)):
            _fail(ValueError, f"params[{name!r}] contains NaN or Inf")
    x_name, x_size = spec["input"]
    if not isinstance(x, np.ndarray):
        _fail(TypeError, f"x must be a numpy array of shape (T, B, {x_size}), got "
              f"{type(x).__name__}")
    if x.ndim != 3:
        _fail(ValueError, f"x must have shape (T, B, {x_size}) (time-major), got {x.shape}")
    if x.dtype != dtype:
        _fail(TypeError, f"x has dtype {x.dtype}, expected {dtype} (the parameters' dtype)")
    if sizes.setdefault(x_size, x.shape[2]) != x.shape[2]:
        _fail(ValueError, f"x has shape {x.shape}, expected (T, B, {x_size}={sizes[x_size]})")
    T, B = x.shape[0], x.shape[1]
    if T < 1 or B < 1:
        _fail(ValueError, f"x has shape {x.shape}: T and B must be at least 1")
    if not np.all(np.isfinite(x)):
        _fail(ValueError, "x contains NaN or Inf")
    out_size = spec["output"][1]
    if targets is not None:
        _check_targets(spec, targets, T, B, sizes[out_size], dtype)
    if state0 is not None:
        if not isinstance(state0, dict):
            _fail(TypeError, f"state0 must be a dict {{state: (B, size) array}}, got "
                  f"{type(state0).__name__}")
        for name, size in spec["states"].items():
            if name not in state0:
                _fail(ValueError, f"state0 is missing the state {name!r} (expected "
                      f"keys {list(spec['states'])})")
            s = state0[name]
            if not isinstance(s, np.ndarray) or s.shape != (B, sizes[size]):
                _fail(ValueError, f"state0[{name!r}] must have shape (B, {size}) = "
                      f"{(B, sizes[size])}, got {getattr(s, 'shape', type(s).__name__)}")
            if s.dtype != dtype:
                _fail(TypeError, f"state0[{name!r}] has dtype {s.dtype}, expected {dtype}")
            if not np.all(np.isfinite(s)):
                _fail(ValueError, f"state0[{name!r}] contains NaN or Inf")
        extra = [k for k in state0 if k not in spec["states"]]
        if extra:
            _fail(ValueError, f"state0 has unknown states {extra}")
    if mask is not None:
        if not isinstance(mask, np.ndarray) or mask.shape != (T, B):
            _fail(ValueError, f"mask must have shape (T, B) = {(T, B)}, got "
                  f"{getattr(mask, 'shape', type(mask).__name__)}")
        if not np.all(np.isfinite(mask)) or np.any(mask < 0):
            _fail(ValueError, "mask must be finite and non-negative")
    return sizes, T, B, dtype


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
            bad = targets[(targets < 0) | (targets >= O)][0]
            _fail(ValueError, f"targets contains class {bad}, outside [0, {O}) "
                  f"({spec['output'][1]} = {O} output units)")
    else:
        if targets.shape != (T, B, O):
            _fail(ValueError, f"targets must have shape (T, B, {spec['output'][1]}) = "
                  f"{(T, B, O)}, got {targets.shape}")
        if targets.dtype != dtype:
            _fail(TypeError, f"targets has dtype {targets.dtype}, expected {dtype}")
        if not np.all(np.isfinite(targets)):
            _fail(ValueError, "targets contains NaN or Inf")


def loss_weights(spec, T, B, mask, dtype):
    """w_tb: the mask (ones by default), only the last step for a last-step loss."""
    w = np.ones((T, B), dtype) if mask is None else mask.astype(dtype)
    if spec["loss_at"] == "last":
        w = w.copy()
        w[:-1] = 0
    total = float(w.sum())
    if total <= 0:
        raise ValueError("mask selects no loss term (its sum is 0)")
    return np.ascontiguousarray(w.reshape(T * B)), total


# -- parameters -----------------------------------------------------------------
def init_params(spec, sizes, *, seed=0, dtype=np.float32):
    """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights, as PyTorch's RNNs; zero biases."""
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
        else:
            bound = 1.0 / math.sqrt(dims[-1] if role == "weight" else dims[0])
            params[name] = rng.uniform(-bound, bound, dims).astype(dtype)
    return params


# -- training -------------------------------------------------------------------
class Trainer:
    """Parameters, an optimizer and a training loop around one generated module.

    Subclassed in each generated module (which sets ``module_name``). ``fit`` runs
    minibatches of whole sequences; with algorithm="tbptt" it updates online,
    every k1 steps, carrying the state forward (seed 003); with "epochwise" it
    sums the gradients of an epoch and updates once at its end (seed 001).
    """

    module_name = None
    OPTIMIZERS = ("sgd", "momentum", "adam")

    def __init__(self, sizes, *, optimizer="sgd", lr=0.1, l2=0.0, clip=None,
                 algorithm="bptt", k1=None, k2=None, seed=0, dtype=np.float32,
                 momentum=0.9, betas=(0.9, 0.999), eps=1e-8):
        import sys

        self.module = sys.modules[self.module_name]
        if optimizer not in self.OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {self.OPTIMIZERS}, got {optimizer!r}")
        if algorithm not in self.module.ALGORITHMS:
            raise ValueError(f"algorithm must be one of {self.module.ALGORITHMS}, "
                             f"got {algorithm!r}")
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be positive or None, got {clip!r}")
        if algorithm == "tbptt":
            windows("tbptt", 1, k1, k2)  # validates k1, k2 early
        self.sizes = dict(zip(self.module.SIZES, sizes)) if isinstance(
            sizes, (tuple, list)) else dict(sizes)
        self.params = self.module.init_params(self.sizes, seed=seed, dtype=dtype)
        self.optimizer, self.lr, self.l2, self.clip = optimizer, lr, l2, clip
        self.algorithm, self.k1, self.k2 = algorithm, k1, k2
        self.momentum, self.betas, self.eps = momentum, betas, eps
        self.dtype = dtype
        self.seed = seed
        self._slots = {}
        self.steps = 0

    # one optimizer step ----------------------------------------------------------
    def loss_and_grads(self, x, targets, **kw):
        kw.setdefault("l2", self.l2)
        return self.module.loss_and_grads(self.params, x, targets, **kw)

    def _clip(self, grads):
        if self.clip is None:
            return grads, None
        norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
        if norm > self.clip:
            scale = self.clip / norm
            grads = {k: g * scale for k, g in grads.items()}
        return grads, norm

    def apply(self, grads):
        """One optimizer update from gradients keyed like the parameters."""
        grads, _ = self._clip(grads)
        self.steps += 1
        for name, g in grads.items():
            p = self.params[name]
            if self.optimizer == "sgd":
                p -= (self.lr * g).astype(p.dtype)
            elif self.optimizer == "momentum":
                v = self._slots.setdefault(name, np.zeros_like(p))
                v *= self.momentum
                v += g
                p -= (self.lr * v).astype(p.dtype)
            else:
                m, v = self._slots.setdefault(name, (np.zeros_like(p), np.zeros_like(p)))
                b1, b2 = self.betas
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * g * g
                mhat = m / (1 - b1 ** self.steps)
                vhat = v / (1 - b2 ** self.steps)
                p -= (self.lr * mhat / (np.sqrt(vhat) + self.eps)).astype(p.dtype)

    def _finite_or_stop(self, loss, grads, backup, where):
        if math.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads.values()):
            return True
        self.params = backup
        self.diverged = where
        return False

    def step(self, x, targets, mask=None):
        """One update on one minibatch; returns the loss before the update."""
        x, targets = self._cast(x, targets)
        if self.algorithm == "tbptt":
            return self._online_tbptt(x, targets, mask)
        loss, grads = self.loss_and_grads(x, targets, algorithm=self.algorithm, mask=mask)
        backup = {k: v.copy() for k, v in self.params.items()}
        if not self._finite_or_stop(loss, grads, backup, f"update {self.steps + 1}"):
            return loss
        self.apply(grads)
        return loss

    def _online_tbptt(self, x, targets, mask):
        """Every k1 steps, backpropagate the last k1 losses over the last k2 steps and
        update at once: later steps run with the updated weights."""
        T, B = x.shape[:2]
        k1, k2 = self.k1, self.k2
        history = [None]  # state at the start of each step, older first
        state = None
        losses, weights = [], []
        for end in range(k1 - 1, T + k1 - 1, k1):
            end = min(end, T - 1)
            start = max(0, end - k2 + 1)
            first = len(history) - 1
            if first > end:
                break
            state0 = history[start] if start < len(history) else None
            w = np.zeros((end - start + 1, B), self.dtype)
            w[first - start:] = 1 if mask is None else mask[first:end + 1]
            loss, grads = self.loss_and_grads(
                x[start:end + 1], targets[start:end + 1], state0=state0, mask=w)
            backup = {k: v.copy() for k, v in self.params.items()}
            if not self._finite_or_stop(loss, grads, backup, f"update {self.steps + 1}"):
                return loss
            losses.append(loss)
            weights.append(float(w.sum()))
            # States along the window under the weights used for it, then update.
            for t in range(first, end + 1):
                _, st = self.module.forward(self.params, x[t:t + 1], state0=history[t])
                history.append(st)
            self.apply(grads)
        return float(np.dot(losses, weights) / max(sum(weights), 1e-12))

    # loops ---------------------------------------------------------------------
    def _cast(self, x, targets):
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if self.module.SPEC["target"] == "vector":
            targets = np.ascontiguousarray(targets, dtype=self.dtype)
        return x, targets

    def fit(self, x, targets, epochs=1, batch_size=None, progress=True, mask=None):
        """Train on x (T, N, I) and targets (T, N[, O]) in minibatches of sequences.

        Returns the history {"loss": [mean loss per epoch]}; stops early, keeping
        the last good parameters, if the loss becomes NaN or Inf (``self.diverged``
        says where).
        """
        N = x.shape[1]
        batch_size = batch_size or N
        rng = np.random.default_rng(self.seed)
        history = {"loss": []}
        self.diverged = None
        bar = _progress(epochs, progress, f"training {self.module.NAME}")
        for epoch in range(epochs):
            order = rng.permutation(N)
            total, count = 0.0, 0
            epoch_grads = None
            for lo in range(0, N, batch_size):
                idx = np.sort(order[lo:lo + batch_size])
                xb, tb = x[:, idx], targets[:, idx]
                mb = None if mask is None else mask[:, idx]
                if self.algorithm == "epochwise":
                    xb, tb = self._cast(xb, tb)
                    loss, grads = self.loss_and_grads(xb, tb, mask=mb)
                    epoch_grads = grads if epoch_grads is None else {
                        k: epoch_grads[k] + grads[k] for k in grads}
                else:
                    loss = self.step(xb, tb, mb)
                if self.diverged or not math.isfinite(loss):
                    self.diverged = self.diverged or f"epoch {epoch + 1}"
                    bar.close()
                    return history
                total += loss * len(idx)
                count += len(idx)
            if epoch_grads is not None:
                batches = -(-N // batch_size)
                self.apply({k: g / batches for k, g in epoch_grads.items()})
            history["loss"].append(total / count)
            bar.update(history["loss"][-1])
        bar.close()
        return history

    def predict(self, x, state0=None):
        """Predictions (T, B, O) for x (T, B, I)."""
        x = np.ascontiguousarray(x, dtype=self.dtype)
        return self.module.forward(self.params, x, state0=state0)[0]

    # persistence -----------------------------------------------------------------
    def save(self, path):
        """Write the parameters to an .npz file atomically (temporary file, rename)."""
        import os
        import tempfile

        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
        os.close(fd)
        try:
            with open(tmp, "wb") as f:
                np.savez(f, __model__=np.array(self.module.NAME), __steps__=self.steps,
                         **self.params)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load(self, path):
        """Read parameters saved by ``save``; checks model name, names and shapes."""
        with np.load(path) as data:
            name = str(data["__model__"])
            if name != self.module.NAME:
                raise ValueError(f"{path} holds parameters of model {name!r}, not "
                                 f"{self.module.NAME!r}")
            for key, p in self.params.items():
                if key not in data:
                    raise ValueError(f"{path} lacks parameter {key!r}")
                if data[key].shape != p.shape:
                    raise ValueError(f"{path}: {key} has shape {data[key].shape}, "
                                     f"expected {p.shape}")
            self.params = {k: data[k].astype(self.dtype) for k in self.params}
            self.steps = int(data["__steps__"])
        return self


class _progress:
    """A minimal progress line on a terminal; silent otherwise or when disabled."""

    def __init__(self, total, enabled, label):
        import sys

        self.total, self.label, self.n = total, label, 0
        self.enabled = bool(enabled) and sys.stderr.isatty()

    def update(self, loss):
        import sys

        self.n += 1
        if self.enabled:
            sys.stderr.write(f"\r{self.label}: {self.n}/{self.total} loss {loss:.4f}")
            sys.stderr.flush()

    def close(self):
        import sys

        if self.enabled:
            sys.stderr.write("\n")
