"""Shared test helpers: the registry of cases, random problems, finite differences."""

import numpy as np

from derive import mse, sigmoid_bce, softmax_cross_entropy, sse
from derive.models import BUILTIN, elman, lstm

LOSSES = {"softmax_ce": softmax_cross_entropy, "sse": sse, "mse": mse,
          "sigmoid_bce": sigmoid_bce}

#: case id -> zero-argument function building the model. Every built-in model, and
#: every loss on the Elman net and the LSTM (the loss code is shared by all models).
CASES = {name: build for name, build in BUILTIN.items()}
for _loss_name, _loss in LOSSES.items():
    if _loss_name != "softmax_ce":
        CASES[f"elman-{_loss_name}"] = (lambda l=_loss: elman(loss=l))
        CASES[f"lstm-{_loss_name}"] = (lambda l=_loss: lstm(loss=l))


#: Cases run through generated Numba modules. Each costs a Numba compilation (the
#: dominant cost of the suite), so the losses are generated on the Elman net only:
#: the loss kernel is printed from the Loss alone, the same for every model.
GENERATED_CASES = [c for c in CASES if not c.startswith("lstm-")]


def tiny_sizes(derivation, n=3):
    """Every size n, but a little different so transposes cannot hide."""
    return {s: n + (i % 2) for i, s in enumerate(derivation.sizes)}


def random_problem(derivation, sizes, T=4, B=2, seed=0, scale=0.5):
    """params, x, targets, state0 in float64."""
    rng = np.random.default_rng(seed)
    params = {p.name: rng.normal(0, scale, [sizes[s] for s in p.shape])
              for p in derivation.params}
    x = rng.normal(0, 1, (T, B, sizes[derivation.input_size]))
    O = sizes[derivation.loss.size]
    if derivation.loss.loss.target == "index":
        targets = rng.integers(0, O, (T, B))
    else:
        targets = rng.uniform(0, 1, (T, B, O))
    state0 = {s.name: rng.normal(0, 0.5, (B, sizes[s.size])) for s in derivation.states}
    return params, x, targets, state0


def finite_difference(loss_fn, params, eps=1e-6):
    """Central differences of loss_fn(params) for every parameter element."""
    grads = {}
    for name, value in params.items():
        g = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            orig = value[idx]
            value[idx] = orig + eps
            up = loss_fn(params)
            value[idx] = orig - eps
            down = loss_fn(params)
            value[idx] = orig
            g[idx] = (up - down) / (2 * eps)
        grads[name] = g
    return grads


def max_relative_error(a, b):
    """max |a - b| / max(|a|, |b|, 1e-3) over elements: relative where the gradient
    is large, absolute (scaled by 1e-3) where both are near zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-3)
    return float(np.max(np.abs(a - b) / denom)) if a.size else 0.0
