"""From a model definition to its Derivation: the one contract with codegen/.

The step is a list of nodes, each linear (z = W v) or elementwise (z = f(args),
f a SymPy expression over element symbols). Reverse mode over that list gives the
local rules, all from ``sympy.diff``:

* elementwise z = f(a, b, ...):   a_bar += z_bar * df/da   (a partial)
* linear z = W v:                 v_bar += W^T z_bar,  W_bar += z_bar v^T

A state's previous value h_prev is the state's value one step earlier, so its
adjoint at step t is added to the state's adjoint at t-1. Sweeping t from T-1 down
to 0 once gives seed 000's accumulated recurrence

    delta_t = dl_t/ds_t + J_{t+1}^T delta_{t+1},

in O(T). A reduction r = sum_k f(a_k, ..) over the units of a vector is one number
per row; its local derivatives are ``sympy.diff`` of the summand f, and the adjoint
of r sums its consumers' contributions over their units:

* reduction r = sum_k f(a_k, ..):  a_bar_k += r_bar * df/da_k   (broadcast)
* u_k = g(.., r):                   r_bar += sum_k u_bar_k * dg/dr  (a Term with reduce)

Nodes are split into three phases so code generators can hoist:

* ``pre``:  depends on no state (input projections): all T steps in one batch
            before the time loop;
* ``loop``: on the recurrent path: step by step;
* ``post``: reads states but feeds no update (the readout and loss): all T steps
            in one batch after the loop.

A reverse state (a bidirectional layer's backward direction) runs from t = T-1 down
to 0: its previous value is s_{t+1}, so its adjoint at step t is added to the state's
adjoint at t+1 and its recurrence runs forward in time. The loop nodes of a reverse
state are marked ``reverse``: they form a second time loop. A loop node may not read
states of both directions (no order computes it); the post phase may.

Weight gradients are sums over t of outer products, so every one is a single
matrix product over all T*B rows once the adjoints are stored. backward.py turns the
partials into these sums once (``Derivation.backward``); the naive O(T^2), truncated
and forward-mode (RTRL) algorithms, the LaTeX and every target read them from there.
"""

from dataclasses import dataclass

import sympy as sp

from . import backward, losses
from .backward import LAM, W_ELEM
from .model import DefinitionError, Model
from .simplify import DropZeroSteps, ThroughStoredValues, simplify


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple  # size names
    kind: str  # "matrix" | "vector"
    role: str  # "weight" | "bias" | "diagonal" | "gain"


@dataclass(frozen=True)
class Node:
    """One vector of the step. ``args`` are the vectors an elementwise node reads
    (nodes, the input, previous states); ``params`` the parameter vectors."""

    name: str
    size: str  # model.SCALAR for a reduction
    kind: str  # "linear" | "elementwise" | "reduction"
    phase: str  # "pre" | "loop" | "post"
    expr: sp.Expr = None  # a reduction's: the summand, per unit of ``over``
    args: tuple = ()
    params: tuple = ()
    weight: str = None
    source: str = None
    over: str = None  # a reduction: the size of the units it sums over
    reverse: bool = False  # a loop node of the reverse direction (t from T-1 down to 0)
    # a linear node weight @ onehot(source), the source the token input: an embedding
    # lookup, which code gathers (forward) and scatter-adds (the weight's gradient)
    lookup: bool = False

    @property
    def units(self):
        """The size the node's expression runs over, element by element."""
        return self.over if self.kind == "reduction" else self.size


@dataclass(frozen=True)
class StateInfo:
    name: str  # the update node's name, holding s_t
    size: str
    prev: str  # the symbol of s_{t-1} (s_{t+1} if reverse)
    reverse: bool = False  # runs from t = T-1 down to 0


@dataclass(frozen=True)
class LossInfo:
    node: str  # the readout z
    size: str
    loss: losses.Loss
    error: sp.Expr  # dl/dz_k in y (prediction) and d (target)
    at: str  # "every" | "last"


@dataclass(frozen=True)
class Derivation:
    name: str
    sizes: tuple
    inputs: tuple  # ((name, size), ...) in the order declared: a call's x, side by side
    states: tuple  # StateInfo
    params: tuple  # Param
    nodes: tuple  # Node, forward order
    backward: backward.Backward  # adjoints, gradients and tangents as sums of Terms
    loss: LossInfo
    l2_penalty: sp.Expr  # per element of a weight matrix, in w and lam
    l2_gradient: sp.Expr
    # the one input is integer tokens in [0, its size), read only by lookup nodes
    tokens: bool = False

    def __repr__(self):
        states = ", ".join(s.name for s in self.states)
        return (f"<Derivation of '{self.name}': states {states}; {len(self.nodes)} nodes, "
                f"{len(self.params)} parameters, loss {self.loss.loss.name} on "
                f"{self.loss.node}; print(d.render('text')) shows it all>")

    def render(self, form="document", index_form=False):
        """The derivation as LaTeX, Markdown or text (derive/latex.py's ``render``)."""
        from .latex import render  # latex.py reads Derivations; it is loaded on use

        return render(self, form, index_form)

    def _repr_markdown_(self):
        """Jupyter shows a Derivation as its derivation, in math (the Markdown form)."""
        return self.render("markdown")

    def node(self, name):
        return self._by_name()[name]

    def _by_name(self):
        return {n.name: n for n in self.nodes}

    @property
    def input_names(self):
        return tuple(name for name, _ in self.inputs)

    @property
    def bidirectional(self):
        """Whether a state runs in reverse (a second time loop, t descending)."""
        return any(s.reverse for s in self.states)

    def phase_nodes(self, phase):
        return tuple(n for n in self.nodes if n.phase == phase)

    def param(self, name):
        return next(p for p in self.params if p.name == name)

    def reductions(self):
        """Names of the reduction nodes (one number per row)."""
        return {n.name for n in self.nodes if n.kind == "reduction"}

    def units_of(self, name):
        """The size a vector's local derivatives run over (a reduction's: its units)."""
        n = self._by_name().get(name)
        return n.units if n is not None else self.size_of(name)

    def size_of(self, name):
        """Size name of any vector: node, input, previous state or vector param."""
        for input_name, size in self.inputs:
            if name == input_name:
                return size
        for s in self.states:
            if name == s.prev:
                return s.size
        for p in self.params:
            if name == p.name:
                return p.shape[0]
        return self.node(name).size





def derive(model: Model) -> Derivation:
    """Check a finished definition and derive its backward pass."""
    _check_complete(model)
    vector_params = {p.name for p in model.params.values() if p.kind == "vector"}
    prevs = {f"{s}_prev": s for s in model.states}

    # Phases: which nodes depend on a state, which feed a state update.
    depends = {name: True for name in prevs}
    for n in model.nodes:
        reads = [n.source] if n.kind == "linear" else [s.name for s in n.expr.free_symbols]
        # A state is computed in the time loop even when it reads no previous state.
        depends[n.name] = n.name in model.states or any(depends.get(r, False) for r in reads)
    feeds = set(model.states)
    for n in reversed(model.nodes):
        if n.name in feeds:
            feeds.update([n.source] if n.kind == "linear" else
                         [s.name for s in n.expr.free_symbols])

    reverse = _reverse_nodes(model, feeds)

    nodes, partials, stored = [], [], []
    rules_tail = [DropZeroSteps()]
    for n in model.nodes:
        if n.name in model.states or (depends[n.name] and n.name in feeds):
            phase = "loop"
        elif depends[n.name]:
            phase = "post"
        else:
            phase = "pre"
        if n.kind == "linear":
            nodes.append(Node(n.name, n.size, "linear", phase, weight=n.weight,
                              source=n.source, lookup=n.lookup,
                              reverse=phase == "loop" and n.name in reverse))
            continue
        # A size in an expression is a number (a mean's divisor), not an argument.
        names = sorted(s.name for s in n.expr.free_symbols if s.name not in model.sizes)
        args = tuple(a for a in names if a not in vector_params)
        params = tuple(a for a in names if a in vector_params)
        own = sp.Symbol(n.name, real=True)
        # A reduction's value is the sum of its summand, not the summand: not stored.
        if not isinstance(n.expr, sp.Symbol) and n.kind != "reduction":
            stored.insert(0, (n.expr, own))
        rules = [ThroughStoredValues(tuple(stored))] + rules_tail
        for wrt in args + params:
            local = sp.diff(n.expr, sp.Symbol(wrt, real=True))
            partials.append((n.name, wrt, simplify(local, rules)))
        nodes.append(Node(n.name, n.size, n.kind, phase, expr=n.expr, args=args,
                          params=params, over=n.over,
                          reverse=phase == "loop" and n.name in reverse))

    out = model.output_node
    if any(n.name == out and n.phase == "loop" for n in nodes):
        raise DefinitionError("the readout feeds the recurrence; make it a state",
                              location=model.states[next(iter(model.states))].location)
    loss = LossInfo(out, model.size_of(out), model.loss, model.loss.error(), model.loss_at)
    penalty = LAM / 2 * W_ELEM ** 2
    states = tuple(StateInfo(s, st.size, f"{s}_prev", st.reverse)
                   for s, st in model.states.items())
    params = tuple(Param(p.name, p.shape, p.kind, p.role) for p in model.params.values())
    return Derivation(
        name=model.name,
        sizes=model.sizes,
        inputs=tuple(model.inputs.items()),
        states=states,
        params=params,
        nodes=tuple(nodes),
        backward=backward.build(nodes, partials, states, params, loss),
        loss=loss,
        l2_penalty=penalty,
        l2_gradient=sp.diff(penalty, W_ELEM),
        tokens=model.tokens_input is not None,
    )


def _reverse_nodes(model, feeds):
    """The loop nodes of the reverse direction: those that read a reverse state. A
    node on the recurrent path (``feeds``) that reads states of both directions is
    refused at its line: one direction's step t needs the other's at t, which is
    computed only after the whole sequence ran the other way."""
    direction = {f"{s}_prev": {st.reverse} for s, st in model.states.items()}
    for n in model.nodes:
        reads = [n.source] if n.kind == "linear" else [s.name for s in n.expr.free_symbols]
        found = set().union(*(direction.get(r, set()) for r in reads))
        if n.name in model.states:
            found.add(model.states[n.name].reverse)
        direction[n.name] = found
        if len(found) > 1 and n.name in feeds:
            fwd = sorted(s for s, st in model.states.items() if not st.reverse)
            rev = sorted(s for s, st in model.states.items() if st.reverse)
            what = (f"the update of '{n.name}'" if n.name in model.states
                    else f"'{n.name}'")
            raise DefinitionError(
                f"{what} reads both forward state(s) {fwd} and reverse state(s) {rev} "
                "and feeds the recurrence: there is no order to compute them in (the "
                "forward direction runs t = 0..T-1, the reverse T-1..0); only the "
                "readout may read both", location=n.location)
    return {name for name, found in direction.items() if found == {True}}


def _check_complete(model):
    if not model.inputs:
        raise DefinitionError(f"model '{model.name}' declares no input (m.input(...))",
                              location=None)
    if not model.states:
        raise DefinitionError(f"model '{model.name}' declares no recurrent state "
                              "(m.state(...))", location=None)
    for st in model.states.values():
        if not st.updated:
            raise DefinitionError(
                f"state '{st.name}' is never updated: add m.update({st.name}, ...)",
                location=st.location)
    if model.output_node is None:
        raise DefinitionError(f"model '{model.name}' has no output: add "
                              "m.output(vector, loss=...)", location=None)
    used = set(model.inputs)
    for n in model.nodes:
        used.update([n.weight, n.source] if n.kind == "linear" else
                    [s.name for s in n.expr.free_symbols])
    for p in model.params.values():
        if p.name not in used:
            raise DefinitionError(f"parameter '{p.name}' is declared but never used",
                                  location=p.location)
    # A call tells the sizes by the shapes of the parameters and the width of x: the
    # inputs side by side, so the width tells one size no parameter has, not two.
    by_params = {s for p in model.params.values() for s in p.shape}
    untold = sorted(set(model.inputs.values()) - by_params)
    if len(untold) > 1:
        raise DefinitionError(
            f"the sizes {untold} of the inputs {list(model.inputs)} are sizes of no "
            "parameter, and a call's x (the inputs side by side) has one width, which "
            "tells one of them: give all but one a parameter, or share a size",
            location=None)
    sized = by_params | set(model.inputs.values())
    for size in model.sizes:
        if size not in sized:
            raise DefinitionError(
                f"size '{size}' of model '{model.name}' is the size of no input and no "
                "parameter, so no argument of a call tells its value: give it a parameter "
                "or use another size", location=None)
    if model.loss.target == "index" and model.loss_at not in ("every", "last"):
        raise DefinitionError("unknown loss schedule")
