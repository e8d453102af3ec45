"""The backward step as data: every adjoint, gradient and tangent as an ordered sum.

derivation.py gives the forward step (nodes) and the local derivatives of each
elementwise node (``sympy.diff``). Reverse mode turns them into sums, once, here:

    adjoint of a vector v     bar(v)  = [w/N dl/dz]                      (v the readout)
                                      + sum over consumers u of v:
                                          bar(u) * du/dv                 ("local")
                                          W^T bar(u)        (u = W v)    ("transpose")
                                      + bar(v_prev) of step t+1          ("carry", v a state;
                                                              step t-1 for a reverse state)
    gradient of a parameter   bar(W)  = sum over products u = W v: bar(u) v^T    ("outer")
                              bar(p)  = sum over u reading p: bar(u) * du/dp     ("local")

A reduction r = sum_k f(a_k, ..) (one number per row) reads its arguments unit by unit:
its own contributions broadcast bar(r) over the units, and a contribution *to* a
reduction, from a node that reads it, is summed over that node's units (a Term with
``reduce``); the tangent of a reduction likewise sums over its units.

and forward mode (RTRL, seed 001) turns the same local derivatives into the tangent
of each vector on the recurrent path:

    u = f(a, .., p):  u_dot = sum_a du/da a_dot + du/dp p_dot    ("local", "direction")
    u = W v:          u_dot = W v_dot + W_dot v                  ("product", "weight")

The LaTeX derivation, the kernel layout and its printers (CPU, CUDA, RTRL) and the
NumPy reference read these sums; none of them assembles a backward step itself.
"""

from dataclasses import dataclass

import sympy as sp

#: How a Term reads: the summand it stands for (see the module docstring).
RULES = {
    "error": "w/N * expr, expr = dl/dz",
    "local": "bar(via) * expr (backward) or expr * dot(via) (tangent), expr = d node / d arg",
    "transpose": "W^T bar(via), via = W target",
    "carry": "bar(via) of step t+1 (t-1 for a reverse state), via = the state's previous "
             "value",
    "outer": "bar(via) source^T, via = W source",
    "direction": "expr * unit direction of the vector parameter via",
    "product": "W dot(via), the product of a tangent",
    "weight": "dot(W) source, the product at fixed source",
}


#: An element of a weight matrix and the L2 coefficient: the penalty lambda/2 w^2 and
#: its gradient are SymPy expressions in these (Derivation.l2_penalty, l2_gradient).
W_ELEM, LAM = sp.symbols("w lambda", real=True)


@dataclass(frozen=True)
class Term:
    """One summand into ``target`` (a vector's adjoint or tangent, a parameter's
    gradient), reading ``via``: the adjoint of a consumer (backward) or the tangent
    of an argument (forward)."""

    rule: str
    target: str
    via: str = None
    expr: sp.Expr = sp.S.One  # the local derivative ("local", "direction", "error")
    weight: str = None  # "transpose", "outer", "product", "weight"
    source: str = None  # "outer", "weight": the product's source vector
    # "local": the target is a reduction (one number per row): the summand is summed
    # over the units of the node the expression belongs to
    reduce: bool = False


@dataclass(frozen=True)
class Backward:
    """The sums of the backward step (and RTRL's tangent step) of one Derivation."""

    sweep: tuple  # vectors with an adjoint, in the order one step's sweep computes them
    terms: tuple  # Term, in forward order of the node each one leaves (push order)
    tangent_vectors: tuple  # vectors with a nonzero tangent, forward order
    directions: tuple  # parameters with RTRL directions, in parameter order
    tangents: tuple  # Term, grouped by target in forward order

    def adjoint(self, name):
        """The summands of bar(name): the output error, the consumers' contributions
        in forward order, then the carry from the next step."""
        terms = [t for t in self.terms if t.target == name
                 and t.rule in ("error", "local", "transpose", "carry")]
        order = {"error": 0, "local": 1, "transpose": 1, "carry": 2}
        return tuple(sorted(terms, key=lambda t: order[t.rule]))

    def consumers(self, name):
        """bar(name)'s summands from the nodes that read it (no error, no carry)."""
        return tuple(t for t in self.terms if t.target == name
                     and t.rule in ("local", "transpose"))

    def leaving(self, node):
        """What ``node``'s adjoint contributes, to vectors and vector parameters:
        its local derivatives in argument order (an elementwise node)."""
        return tuple(t for t in self.terms if t.via == node and t.rule == "local")

    def gradient(self, param):
        """The summands of a parameter's gradient (over all steps), forward order."""
        return tuple(t for t in self.terms if t.target == param
                     and t.rule in ("outer", "local"))

    def tangent(self, name):
        """The summands of a vector's tangent, in the order of the node's arguments."""
        return tuple(t for t in self.tangents if t.target == name)


def build(nodes, partials, states, params, loss):
    """The Backward of a step: ``nodes`` in forward order, ``partials`` the local
    derivatives ((node, arg, expr), grouped by node, in argument order)."""
    vector_params = {p.name for p in params if p.kind == "vector"}
    reductions = {n.name for n in nodes if n.kind == "reduction"}
    terms = []
    for n in nodes:
        if n.kind == "linear":
            terms.append(Term("transpose", n.source, n.name, weight=n.weight))
            terms.append(Term("outer", n.weight, n.name, weight=n.weight, source=n.source))
            continue
        terms += [Term("local", arg, n.name, expr, reduce=arg in reductions)
                  for node, arg, expr in partials if node == n.name]
    terms.append(Term("error", loss.node, None, loss.error))
    read = {t.target for t in terms if t.rule in ("local", "transpose")}
    terms += [Term("carry", s.name, s.prev) for s in states if s.prev in read]
    sweep = [n.name for n in reversed(nodes)] + [s.prev for s in states if s.prev in read]

    tangent_vectors = _tangent_vectors(nodes, states)
    has = set(tangent_vectors)
    directions = []
    for n in nodes:
        if n.name in has:
            directions += [n.weight] if n.kind == "linear" else list(n.params)
    directions = tuple(p.name for p in params if p.name in directions)
    tangents = []
    for n in nodes:
        if n.name not in has or n.name in {s.prev for s in states}:
            continue
        if n.kind == "linear":
            if n.source in has:
                tangents.append(Term("product", n.name, n.source, weight=n.weight))
            tangents.append(Term("weight", n.name, weight=n.weight, source=n.source))
            continue
        for node, arg, expr in partials:
            if node == n.name and expr != 0 and (arg in has or arg in vector_params):
                rule = "direction" if arg in vector_params else "local"
                tangents.append(Term(rule, n.name, arg, expr, reduce=n.name in reductions))
    return Backward(tuple(sweep), tuple(terms), tangent_vectors, directions,
                    tuple(tangents))


def _tangent_vectors(nodes, states):
    """The vectors forward-mode RTRL carries a derivative along the parameters for:
    the previous states, and the pre and loop nodes on the recurrent path (a state
    reads them) that read one of these or a parameter, in order."""
    feeds = {s.name for s in states}
    for n in reversed(nodes):
        if n.name in feeds:
            feeds.update([n.source] if n.kind == "linear" else n.args)
    out = [s.prev for s in states]
    for n in nodes:
        if n.phase != "post" and n.name in feeds and (
                n.kind == "linear" or n.params or any(a in out for a in n.args)):
            out.append(n.name)
    return tuple(out)
