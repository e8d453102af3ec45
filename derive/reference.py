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
    (vocab,) = (size for _, size in derivation.inputs)
    V = next(np.shape(params[p.name])[1] for p in derivation.params
             if p.kind == "matrix" and p.shape[1] == vocab)
    return np.eye(V)[x]


def resolve_sizes(derivation, params, x):
    """Size name -> int, read off the parameter shapes and the width of x (the inputs
    side by side: it tells the one input size no parameter has, if any)."""
    sizes = {}
    for p in derivation.params:
        for size, n in zip(p.shape, np.shape(params[p.name])):
            if sizes.setdefault(size, n) != n:
                raise ValueError(f"size {size} is {sizes[size]} elsewhere but "
                                 f"{p.name} has shape {np.shape(params[p.name])}")
    input_sizes = [size for _, size in derivation.inputs]
    untold = {size for size in input_sizes if size not in sizes}
    if untold:
        (size,) = untold  # derive() allows one
        rest = x.shape[2] - sum(sizes[s] for s in input_sizes if s in sizes)
        sizes[size] = rest // input_sizes.count(size)
    if sum(sizes[s] for s in input_sizes) != x.shape[2]:
        raise ValueError(f"x has width {x.shape[2]}, but the inputs {input_sizes} are "
                         f"{[sizes[s] for s in input_sizes]} wide")
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


def _direction_of(derivation, name):
    """Which pass computes a vector (or its adjoint): "pre", "forward" (the forward
    time loop), "reverse" (the reverse states' loop) or "post"."""
    for st in derivation.states:
        if name == st.prev:
            return "reverse" if st.reverse else "forward"
    n = derivation.node(name)
    if n.phase == "loop":
        return "reverse" if n.reverse else "forward"
    return n.phase


def _run_forward(derivation, params, x, state0):
    """The values of every vector at every step: the forward states' loop with t
    ascending (and the pre nodes), the reverse states' loop with t descending, then
    the readout at every step."""
    x = _input_vectors(derivation, params, x)
    T, B, _ = x.shape
    sizes = resolve_sizes(derivation, params, x)
    vector_params = {p.name: np.asarray(params[p.name], dtype=np.float64)
                     for p in derivation.params if p.kind == "vector"}
    # a size in an expression (a mean's divisor) is its value
    columns = np.cumsum([0] + [sizes[size] for _, size in derivation.inputs])
    inputs = {name: x[:, :, lo:hi]
              for (name, _), lo, hi in zip(derivation.inputs, columns, columns[1:])}
    trajectory = [{**{name: v[t] for name, v in inputs.items()}, **vector_params,
                   **{s: sizes[s] for s in derivation.sizes}} for t in range(T)]
    passes = (("forward", range(T)), ("reverse", range(T - 1, -1, -1)), ("post", range(T)))
    for direction, steps in passes:
        states = [s for s in derivation.states if ("reverse" if s.reverse else "forward")
                  == direction]
        nodes = [n for n in derivation.nodes if _direction_of(derivation, n.name) ==
                 direction or (direction == "forward" and n.phase == "pre")]
        state = {s.prev: (np.zeros((B, sizes[s.size])) if state0 is None else
                          np.asarray(state0[s.name], dtype=np.float64)) for s in states}
        for t in steps:
            env = trajectory[t]
            env.update(state)
            for n in nodes:
                env[n.name] = _value(n, env, params, sizes, B)
            state = {s.prev: env[s.name] for s in states}
    return trajectory, sizes


def _value(n, env, params, sizes, B):
    """The value (B, size) of node n at one step, its arguments' values in env."""
    if n.kind == "linear":
        return env[n.source] @ np.asarray(params[n.weight], np.float64).T
    if n.kind == "reduction":  # (B, 1): the summand summed over the units
        return np.broadcast_to(evaluate(n.expr, env), (B, sizes[n.over])).sum(
            axis=1, keepdims=True)
    return np.broadcast_to(evaluate(n.expr, env), (B, sizes[n.size])).astype(np.float64)


def _final(derivation, trajectory):
    """Each state's final value: the last step's, or the first step's if reverse."""
    return {s.name: trajectory[0 if s.reverse else -1][s.name].copy()
            for s in derivation.states}


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
    return ys, _final(derivation, trajectory)


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

    if carry is not None and derivation.bidirectional:
        raise ValueError("carry factors cut a forward recurrence; a reverse state has none")
    seeds, bar = [], [{} for _ in range(T)]
    for t in range(T):
        value, _, error = _loss_terms(derivation, trajectory[t][derivation.loss.node],
                                      targets[t], sizes)
        loss += float(np.sum(w[t] * value)) / total
        seeds.append(error * (w[t] / total)[:, None])

    def sweep(t, direction, carried):
        """The adjoints of one pass at step t, in the order of the step's sweep."""
        for name in bw.sweep:
            if _direction_of(derivation, name) != direction:
                continue
            bar[t][name] = np.zeros((B, sizes[derivation.size_of(name)]))
            for term in bw.adjoint(name):
                bar[t][name] = bar[t][name] + _summand(term, bar[t], trajectory[t], P,
                                                       seeds[t], carried, units(term))

    def zeros(reverse):
        return {s.prev: np.zeros((B, sizes[s.size])) for s in derivation.states
                if s.reverse == reverse}

    # The readout first; the forward states' recurrence from the last step down; the
    # reverse states' from the first step up (their previous value is at t+1); then
    # the nodes before the loop, which every pass may read.
    for t in range(T):
        sweep(t, "post", {})
    carried = zeros(False)
    for t in reversed(range(T)):
        sweep(t, "forward", carried)
        factor = 1.0 if carry is None else carry[t]
        carried = {s.prev: factor * bar[t].get(s.prev, 0.0) for s in derivation.states
                   if not s.reverse}
    carried = zeros(True)
    for t in range(T):
        sweep(t, "reverse", carried)
        carried = {s.prev: bar[t].get(s.prev, 0.0) for s in derivation.states if s.reverse}
    for t in range(T):
        sweep(t, "pre", {})
        for p in derivation.params:
            for term in bw.gradient(p.name):
                g = _summand(term, bar[t], trajectory[t], P, seeds[t], {}, units(term))
                grads[p.name] += g if term.rule == "outer" else g.sum(axis=0)
    for p in derivation.params:
        if p.role == "weight" and l2:
            loss += float(np.sum(evaluate(derivation.l2_penalty, {"w": P[p.name], "lambda": l2})))
            grads[p.name] += evaluate(derivation.l2_gradient, {"w": P[p.name], "lambda": l2})
    return loss, grads
