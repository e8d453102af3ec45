"""A plain NumPy evaluation of a Derivation: the specification kernels are tested against.

Slow on purpose: one step at a time, every expression through ``sympy.lambdify``,
no hoisting, no fusing. Forward, then the accumulated backward sweep of
derivation.py. Loss convention, shared by every generated module:

    L = sum_{t,b} w_tb l_tb / sum_{t,b} w_tb  +  lambda/2 sum_W ||W||^2

with w the mask (all ones by default; only the last step for ``at="last"``).
"""

from functools import lru_cache

import numpy as np
import sympy as sp

from .functions import numpy_implementations
from .model import SCALAR


@lru_cache(maxsize=None)
def _compiled(expr, names):
    return sp.lambdify([sp.Symbol(n, real=True) for n in names], expr,
                       modules=[numpy_implementations(), "numpy"])


def evaluate(expr, env):
    """Evaluate a SymPy expression with NumPy arrays bound by symbol name."""
    names = tuple(sorted(s.name for s in expr.free_symbols))
    value = _compiled(expr, names)(*(env[n] for n in names))
    return value


def _input_vectors(derivation, params, x):
    """x as float64 vectors (T, B, size). Tokens (T, B) become one-hot vectors: the
    reference evaluates a lookup E[x] as the product E @ onehot(x) it stands for, so
    the generated gather and scatter-add are checked against the plain product."""
    x = np.asarray(x)
    if not derivation.tokens or x.ndim == 3:  # vectors (or tokens made one-hot already)
        return np.asarray(x, dtype=np.float64)
    V = next(np.shape(params[p.name])[1] for p in derivation.params
             if p.kind == "matrix" and p.shape[1] == derivation.input_size)
    return np.eye(V)[x]


def resolve_sizes(derivation, params, x):
    """Size name -> int, read off the parameter shapes and the input."""
    sizes = {derivation.input_size: x.shape[2]}
    for p in derivation.params:
        for size, n in zip(p.shape, np.shape(params[p.name])):
            if sizes.setdefault(size, n) != n:
                raise ValueError(f"size {size} is {sizes[size]} elsewhere but "
                                 f"{p.name} has shape {np.shape(params[p.name])}")
    missing = set(derivation.sizes) - set(sizes)
    if missing:
        raise ValueError(f"sizes {sorted(missing)} cannot be read from the parameters")
    sizes[SCALAR] = 1  # a reduction's value: one number per row
    return sizes


def loss_weights(derivation, T, B, mask=None):
    """w_tb of the loss convention: the mask, restricted to the last step if the
    model's loss is at the last step only."""
    w = np.ones((T, B)) if mask is None else np.asarray(mask, dtype=np.float64)
    if derivation.loss.at == "last":
        w = w.copy()
        w[:-1] = 0.0
    return w


def _run_forward(derivation, params, x, state0):
    x = _input_vectors(derivation, params, x)
    T, B, _ = x.shape
    sizes = resolve_sizes(derivation, params, x)
    state = {s.prev: (np.zeros((B, sizes[s.size])) if state0 is None else
                      np.asarray(state0[s.name], dtype=np.float64)) for s in derivation.states}
    vector_params = {p.name: np.asarray(params[p.name], dtype=np.float64)
                     for p in derivation.params if p.kind == "vector"}
    trajectory = []
    for t in range(T):
        # a size in an expression (a mean's divisor) is its value
        env = {derivation.input: x[t], **state, **vector_params,
               **{s: sizes[s] for s in derivation.sizes}}
        for n in derivation.nodes:
            if n.kind == "linear":
                env[n.name] = env[n.source] @ np.asarray(params[n.weight], np.float64).T
            elif n.kind == "reduction":  # (B, 1): the summand summed over the units
                env[n.name] = np.broadcast_to(evaluate(n.expr, env), (B, sizes[n.over])).sum(
                    axis=1, keepdims=True)
            else:
                env[n.name] = np.broadcast_to(evaluate(n.expr, env),
                                              (B, sizes[n.size])).astype(np.float64)
        trajectory.append(env)
        state = {s.prev: env[s.name] for s in derivation.states}
    return trajectory, sizes


def _loss_terms(derivation, zt, target, sizes):
    """Per-row loss (B,), prediction y and error dl/dz (B, O) of one step."""
    loss = derivation.loss.loss
    O = zt.shape[1]
    if loss.target == "index":
        dt = np.zeros_like(zt)
        dt[np.arange(zt.shape[0]), np.asarray(target, dtype=np.int64)] = 1.0
    else:
        dt = np.asarray(target, dtype=np.float64)
    env = {"z": zt, "d": dt, "m": zt.max(axis=1, keepdims=True), "K": O}
    for sym, summand in loss.sums:
        env[sym.name] = np.sum(np.broadcast_to(evaluate(summand, env), zt.shape),
                               axis=1, keepdims=True)
    value = np.broadcast_to(evaluate(loss.value, env), (zt.shape[0], 1))[:, 0]
    y = np.broadcast_to(evaluate(loss.prediction, env), zt.shape)
    error = np.broadcast_to(evaluate(derivation.loss.error, {**env, "y": y}), zt.shape)
    return value, y, error


def forward(derivation, params, x, state0=None):
    """Predictions y (T, B, O) and the final states."""
    x = _input_vectors(derivation, params, x)
    trajectory, sizes = _run_forward(derivation, params, x, state0)
    out = derivation.loss.node
    dummy = (np.zeros(x.shape[1], dtype=np.int64) if derivation.loss.loss.target == "index"
             else np.zeros((x.shape[1], sizes[derivation.loss.size])))
    ys = np.stack([_loss_terms(derivation, env[out], dummy, sizes)[1] for env in trajectory])
    final = {s.name: trajectory[-1][s.name].copy() for s in derivation.states}
    return ys, final


def _summand(term, bar, env, P, seed, carried, units):
    """One Term of backward.py at one step: ``bar`` the adjoints computed so far,
    ``env`` the step's values, ``seed`` the weighted output error, ``carried`` the
    previous states' adjoints from step t+1, ``units`` (B, n) the shape the via
    node's expression runs over."""
    if term.rule == "error":
        return seed
    if term.rule == "local":
        value = bar[term.via] * np.broadcast_to(evaluate(term.expr, env), units)
        return value.sum(axis=1, keepdims=True) if term.reduce else value
    if term.rule == "transpose":
        return bar[term.via] @ P[term.weight]
    if term.rule == "carry":
        return carried[term.via]
    if term.rule == "outer":
        return bar[term.via].T @ env[term.source]
    raise ValueError(f"no backward rule {term.rule!r}")


def loss_and_grads(derivation, params, x, targets, *, state0=None, mask=None, l2=0.0,
                   carry=None):
    """Loss and gradients (dict keyed like params) by the accumulated recurrence.

    ``carry``: per-step factors (T,) of the state adjoints flowing from step t to
    step t-1 (0 cuts the recurrence, ARTBP reweights it); None: all ones, BPTT."""
    x = _input_vectors(derivation, params, x)
    T, B, _ = x.shape
    trajectory, sizes = _run_forward(derivation, params, x, state0)
    w = loss_weights(derivation, T, B, mask)
    total = w.sum()
    if total <= 0:
        raise ValueError("the mask selects no loss term")
    P = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    grads = {k: np.zeros_like(v) for k, v in P.items()}
    loss = 0.0
    bw = derivation.backward

    def units(term):
        return (B, sizes[derivation.units_of(term.via)]) if term.via else None

    carried = {s.prev: np.zeros((B, sizes[s.size])) for s in derivation.states}
    for t in reversed(range(T)):
        env = trajectory[t]
        value, _, error = _loss_terms(derivation, env[derivation.loss.node], targets[t], sizes)
        loss += float(np.sum(w[t] * value)) / total
        seed = error * (w[t] / total)[:, None]
        bar = {}
        for name in bw.sweep:
            bar[name] = np.zeros((B, sizes[derivation.size_of(name)]))
            for term in bw.adjoint(name):
                bar[name] = bar[name] + _summand(term, bar, env, P, seed, carried,
                                                 units(term))
        for p in derivation.params:
            for term in bw.gradient(p.name):
                g = _summand(term, bar, env, P, seed, carried, units(term))
                grads[p.name] += g if term.rule == "outer" else g.sum(axis=0)
        factor = 1.0 if carry is None else carry[t]
        carried = {s.prev: factor * bar.get(s.prev, 0.0) for s in derivation.states}
    for p in derivation.params:
        if p.role == "weight" and l2:
            loss += float(np.sum(evaluate(derivation.l2_penalty, {"w": P[p.name], "lambda": l2})))
            grads[p.name] += evaluate(derivation.l2_gradient, {"w": P[p.name], "lambda": l2})
    return loss, grads
