"""Tier-1 machinery: the whole unrolled loss as one SymPy expression, and its exact
gradient.

``unrolled_loss`` writes the loss of a sequence (B = 1) as a single SymPy expression
in one symbol per parameter element, straight from the model's node definitions:
a linear node is the explicit sum ``sum_j W[k,j] * v[j]`` (a lookup E[x] the symbols
of column x_t), an elementwise node is ``Node.expr`` with the element values
substituted, a reduction the explicit sum of its
summand over the units (one value, read by every unit; a size is its number), and the loss is built from
``Loss.sums`` / ``Loss.value`` with a one-hot target d and the shift m = 0 (log-sum-
exp is shift invariant, so the shift changes no value). Nothing of ``derive()``'s
output is used: no partials, phases, adjoints or simplified loss error.

That expression is a tree whose size grows like (fan-in)^T, and ``sympy.diff`` of
it re-walks shared subtrees (and queries assumptions) at every level: for the
Elman net at H = 2, T = 3 it takes seconds, for a GRU minutes. ``exact_gradient``
therefore differentiates the same expression with the chain rule over its DAG of
distinct subexpressions, each local derivative from ``sympy.diff`` of the
subexpression's own head (``tanh(u)``, ``a*b*c``, ``a**b``, ...), and evaluates in
40-digit mpmath arithmetic. ``test_symbolic.py`` checks, on cases small enough,
that it agrees with plain ``sympy.diff`` of the whole expression.
"""

import mpmath
import numpy as np
import sympy as sp

from bpttgen.derive.functions import relu, sigmoid, softplus
from bpttgen.derive.losses import K, d, m, z

DIGITS = 40

#: Custom functions written out in elementary form, so the check does not trust
#: their ``fdiff`` rules either.
ELEMENTARY = (
    (sigmoid, lambda a: 1 / (1 + sp.exp(-a))),
    (softplus, lambda a: sp.log(1 + sp.exp(a))),
    (relu, lambda a: sp.Max(a, 0)),
)


def elementary(expr):
    for function, written_out in ELEMENTARY:
        expr = expr.replace(function, written_out)
    return expr


def parameter_symbols(model, sizes):
    """name -> object array of real symbols ``W[i,j]`` / ``b[i]``."""
    symbols = {}
    for p in model.params.values():
        shape = tuple(sizes[s] for s in p.shape)
        arr = np.empty(shape, dtype=object)
        for idx in np.ndindex(shape):
            arr[idx] = sp.Symbol(f"{p.name}[{','.join(map(str, idx))}]", real=True)
        symbols[p.name] = arr
    return symbols


def _numbers(values):
    return [sp.Float(float(v)) for v in np.ravel(values)]


def unrolled_loss(model, sizes, x, targets, state0, *, mask=None, l2=0.0, as_written=True):
    """See _unrolled_loss. ``as_written`` builds it unevaluated: SymPy's automatic
    rewriting on construction costs minutes for a GRU; plain ``sympy.diff`` is
    faster on the evaluated form."""
    with sp.evaluate(not as_written):
        return _unrolled_loss(model, sizes, x, targets, state0, mask, l2)


def _unrolled_loss(model, sizes, x, targets, state0, mask, l2):
    """(L, symbols): the loss of the sequence x (T, 1, I) as one SymPy expression.

    The convention of derive/reference.py: L = sum_t w_t l_t / sum_t w_t +
    l2/2 * sum of squares of every weight matrix, w the mask, zero before the last
    step when the loss is at the last step only."""
    T, B = np.shape(x)[:2]
    assert B == 1, "the unrolled loss is written for one sequence"
    symbols = parameter_symbols(model, sizes)
    vector_params = {n: list(symbols[n]) for n, p in model.params.items() if p.kind == "vector"}
    exprs = {n.name: elementary(n.expr) for n in model.nodes if n.kind != "linear"}
    numbers = {sp.Symbol(s, real=True): sp.Integer(sizes[s]) for s in model.sizes}
    one = {n.name for n in model.nodes if n.kind == "reduction"}  # one value per row
    w = np.ones((T, 1)) if mask is None else np.asarray(mask, dtype=np.float64).reshape(T, 1)
    if model.loss_at == "last":
        w = w.copy()
        w[:-1] = 0.0
    loss = model.loss
    sums = [(sym, elementary(summand)) for sym, summand in loss.sums]
    value = elementary(loss.value)

    # Straight from the definition: a node reading a reverse state (through any
    # chain) belongs to the reverse pass, t from T-1 down to 0, whose previous state
    # is the one at t+1; every other node to the forward pass. The readout is
    # evaluated after both, at every step.
    reverse = {f"{s}_prev" for s, st in model.states.items() if st.reverse}
    for n in model.nodes:
        reads = [n.source] if n.kind == "linear" else [s.name for s in n.expr.free_symbols]
        if any(r in reverse for r in reads) or getattr(model.states.get(n.name), "reverse",
                                                       False):
            reverse.add(n.name)
    feeds = set(model.states)
    for n in reversed(model.nodes):
        if n.name in feeds:
            feeds.update([n.source] if n.kind == "linear" else
                         [s.name for s in n.expr.free_symbols])
    readout = {n.name for n in model.nodes if n.name not in feeds}
    tokens = model.tokens_input is not None  # x (T, 1) integers: a lookup reads x_t
    # several inputs: x[t] holds them side by side, in the order declared
    edges = np.cumsum([0] + [sizes[size] for size in model.inputs.values()])
    envs = [{**({next(iter(model.inputs)): int(np.ravel(x[t])[0])} if tokens else
                {name: _numbers(np.asarray(x[t])[..., lo:hi])
                 for name, lo, hi in zip(model.inputs, edges, edges[1:])}),
             **vector_params} for t in range(T)]
    for pass_reverse, steps in ((False, range(T)), (True, range(T - 1, -1, -1))):
        states = [s for s, st in model.states.items() if st.reverse == pass_reverse]
        prev = {f"{s}_prev": _numbers(state0[s]) for s in states}
        for t in steps:
            env = envs[t]
            env.update(prev)
            for n in model.nodes:
                if (n.name in reverse) == pass_reverse and n.name not in readout:
                    _unrolled_node(n, env, symbols, exprs, numbers, one, sizes)
            prev = {f"{s}_prev": env[s] for s in states}
    terms = []
    for t in range(T):
        env = envs[t]
        for n in model.nodes:
            if n.name in readout:
                _unrolled_node(n, env, symbols, exprs, numbers, one, sizes)
        if w[t, 0] == 0:
            continue
        zs = env[model.output_node]
        O = len(zs)
        if loss.target == "index":
            ds = [sp.Integer(int(k == int(np.ravel(targets[t])[0]))) for k in range(O)]
        else:
            ds = _numbers(targets[t])
        reduced = {sym: sp.Add(*[s.xreplace({z: zs[k], d: ds[k], m: 0, K: O})
                                 for k in range(O)]) for sym, s in sums}
        terms.append(sp.Float(w[t, 0]) * value.xreplace({**reduced, m: 0, K: O}))
    L = sp.Add(*terms) / sp.Float(w.sum())
    if l2:
        squares = [e ** 2 for p in model.params.values() if p.role == "weight"
                   for e in symbols[p.name].ravel()]
        L = L + sp.Float(l2) / 2 * sp.Add(*squares)
    return L, symbols


def _unrolled_node(n, env, symbols, exprs, numbers, one, sizes):
    """env[n.name]: node n's element expressions at one step."""
    if n.kind == "linear" and n.lookup:  # E[x]: column x_t of the table
        W = symbols[n.weight]
        env[n.name] = [W[k, env[n.source]] for k in range(W.shape[0])]
        return
    if n.kind == "linear":
        W, v = symbols[n.weight], env[n.source]
        env[n.name] = [sp.Add(*[W[k, j] * v[j] for j in range(len(v))])
                       for k in range(W.shape[0])]
        return
    e = exprs[n.name].xreplace(numbers)
    free = e.free_symbols
    units = [e.xreplace({s: env[s.name][0 if s.name in one else k] for s in free})
             for k in range(sizes[n.over if n.name in one else n.size])]
    env[n.name] = [sp.Add(*units)] if n.name in one else units


_HEADS = {}


def _head(expr):
    """(value, [d value / d arg_i]) of expr's head as functions of its arguments,
    the partials from ``sympy.diff`` of the head applied to dummy arguments."""
    key = (expr.func, len(expr.args))
    if key not in _HEADS:
        dummies = sp.symbols(f"a0:{len(expr.args)}", real=True)
        head = expr.func(*dummies)
        partials = [sp.diff(head, a) for a in dummies]
        _HEADS[key] = sp.lambdify(dummies, [head] + partials,
                                  modules=[{"Heaviside": lambda v, h=0.5: mpmath.mpf(v > 0)},
                                           "mpmath"])
    return _HEADS[key]


def _number(expr):
    return mpmath.mpf(str(sp.Float(expr.evalf(DIGITS + 10), DIGITS + 10)))


def _forward(expr, values):
    """Post-order of the distinct subexpressions of expr, their values, and the
    partials of each one's head at its arguments (None for a leaf)."""
    order, index, stack = [], {}, [(expr, False)]
    while stack:  # each distinct subexpression once, children first
        e, done = stack.pop()
        if e in index:
            continue
        if done:
            index[e] = len(order)
            order.append(e)
            continue
        stack.append((e, True))
        if not (e.is_Symbol or e.is_Number or e.is_NumberSymbol):
            stack.extend((a, False) for a in e.args if a not in index)
    val, local = [None] * len(order), [None] * len(order)
    for i, e in enumerate(order):
        if e.is_Symbol:
            val[i] = mpmath.mpf(float(values[e]))
        elif e.is_Number or e.is_NumberSymbol:
            val[i] = _number(e)
        else:
            out = _head(e)(*(val[index[a]] for a in e.args))
            val[i], local[i] = out[0], out[1:]
    return order, index, val, local


def evaluate(expr, values):
    """expr at ``values`` ({symbol: float}) in DIGITS-digit arithmetic."""
    with mpmath.workdps(DIGITS):
        return _forward(sp.sympify(expr), values)[2][-1]


def exact_gradient(L, values):
    """(L, {symbol: dL/dsymbol}) at ``values`` ({symbol: float}), in mpmath floats.

    Reverse accumulation over the distinct subexpressions of L: every local
    derivative is ``sympy.diff`` of one subexpression's head."""
    with mpmath.workdps(DIGITS):
        order, index, val, local = _forward(L, values)
        adjoint = [mpmath.mpf(0)] * len(order)
        adjoint[-1] = mpmath.mpf(1)
        for i in reversed(range(len(order))):
            if local[i] is None or adjoint[i] == 0:
                continue
            for a, partial in zip(order[i].args, local[i]):
                adjoint[index[a]] += adjoint[i] * partial
        return val[-1], {e: adjoint[i] for i, e in enumerate(order) if e.is_Symbol}


def symbolic_loss_and_grads(model, sizes, params, x, targets, state0, *, mask=None, l2=0.0):
    """Loss and gradients (float64, keyed like params) from the unrolled expression."""
    L, symbols = unrolled_loss(model, sizes, x, targets, state0, mask=mask, l2=l2)
    values = {symbols[n][idx]: params[n][idx] for n in params for idx in np.ndindex(params[n].shape)}
    value, grads = exact_gradient(L, values)
    zero = mpmath.mpf(0)
    out = {n: np.array([float(grads.get(s, zero)) for s in symbols[n].ravel()]).reshape(
        symbols[n].shape) for n in params}
    return float(value), out
