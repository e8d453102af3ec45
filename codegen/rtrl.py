"""Forward-mode sensitivities (RTRL) of a Plan's step: the printed JVP lines.

Data flow: Derivation -> Plan (plan.py) -> RtrlPlan (here) -> templates/cpu_rtrl.py.j2.

Real-time recurrent learning (seed 001) carries the sensitivities of the states
to the parameters, S_t = ds_t/dtheta, forward in time,

    S_t = J_t S_{t-1} + ds_t/dtheta (s_{t-1} held fixed),

and adds (dl_t/ds_t) S_t to the gradient at every step: the gradient of the losses
seen so far is known online, with no backward sweep. Nothing is derived a second
time: S_t is the tangent of the step (a JVP) along all NP parameter directions at
once, built node by node from the same node list and Partials as the backward
pass, read forwards: the tangent sums of the Derivation's Backward
(derive/backward.py),

* elementwise z = f(a, ..., p):  z_dot = sum_a (df/da) a_dot + (df/dp) p_dot,
  df/da the local derivative; p_dot: the unit direction of each element p_k;
* linear z = W v:                z_dot = W v_dot + W_dot v, where W_dot v puts v_j
  in row i of the direction of W_ij (a lookup E[x], v = onehot(x_t): a one in
  column x_t);
* reduction r = sum_k f(a_k, ..): r_dot = sum_k (df/da_k a_dot_k + df/dp_k p_dot_k), one
  row (a reduction is one number per sequence), read by every unit of its consumers.

A tangent is a 2-D array (size, B*NP): row k, column b*NP + p holds the derivative
of element k of sequence b along direction p, so W v_dot is one GEMM per product
group and step for the whole batch. Only parameters that reach a state (those of
the pre and loop nodes on the recurrent path) get directions; the readout's
parameters take their gradient from the hoisted backward of the post phase, as in
BPTT, and so does a path from a parameter through a pre node straight to the
readout. Memory O(B H NP), cost O(B H^2 NP) per step: O(H^4) for H hidden units.
"""

from dataclasses import dataclass, field

import sympy as sp

from bpttgen.derive import naming
from bpttgen.derive.naming import code_tangent as dot
from bpttgen.derive.simplify import cse


@dataclass
class Direction:
    """A parameter with forward-mode directions: columns first .. first + count."""

    param: str
    shape: tuple  # size names
    count: sp.Expr  # number of elements, in size symbols
    first: sp.Expr  # first column of the direction axis


@dataclass
class StepBlock:
    comment: str
    lines: list = field(default_factory=list)  # code lines inside the time loop


class RtrlPlan:
    """The RTRL kernel of one Plan: direction layout, tangent arrays, step lines."""

    def __init__(self, plan):
        self.plan = plan
        d = plan.d
        self.d = d
        self.has = set(d.backward.tangent_vectors)  # vectors whose tangent is not zero
        self.directions = self._directions()
        self.np = sum((x.count for x in self.directions), sp.S.Zero)
        self.groups = [g for g in plan.groups if g.phase in ("pre", "loop")
                       and any(m[0] in self.has for m in g.members)]
        self.tangents = self._tangents()
        # S_{t-1} of each state: the caller's sensitivities, in and out.
        self._carried = {dot(s.prev): s.name for s in d.states}
        self.blocks = []
        for phase in ("pre", "loop"):
            for block in plan.blocks[phase]:
                if block.kind == "linear" and block.group in self.groups:
                    self.blocks.append(self._linear(block.group))
                elif block.kind == "elementwise" and \
                        any(n in self.has for n in block.nodes):
                    self.blocks.append(self._elementwise(block))
                elif block.kind == "reduction" and block.nodes[0] in self.has:
                    self.blocks.append(self._reduction(block))
        self.blocks.append(self._gradient())
        # Element by element: Numba compiles an array-to-slice assignment with a
        # formatted shape-mismatch error (str, join, repr of tuples), 5-12 s of
        # compile for the RTRL kernel alone.
        carry = []
        for s in d.states:
            carry += [f"for _k in range({dot(s.name)}.shape[0]):",
                      f"    for _p in range({dot(s.name)}.shape[1]):",
                      f"        {dot(s.prev)}[_k, _p] = {dot(s.name)}[_k, _p]"]
        self.blocks.append(StepBlock(
            "carry the sensitivities: S_{t-1} of the next step is S_t", carry))

    # -- layout ---------------------------------------------------------------
    def _directions(self):
        out, first = [], sp.S.Zero
        for p in self.d.params:
            if p.name in self.d.backward.directions:
                count = sp.Mul(*(sp.Symbol(s) for s in p.shape))
                out.append(Direction(p.name, tuple(p.shape), count, first))
                first += count
        return out

    def _tangents(self):
        """(array name, rows) of every tangent the kernel keeps, one step at a time."""
        out = []
        for s in self.d.states:
            out += [(dot(s.prev), s.size), (dot(s.name), s.size)]
        out += [(dot(g.name), g.width) for g in self.groups]
        out += [(dot(n.name), n.size) for n in self.d.nodes
                if n.kind != "linear" and n.name in self.has
                and n.name not in self.plan.state_names]
        return out

    def tangent(self, name, row, col):
        """Code for element (row, col) of a vector's tangent; None if it is zero."""
        if name not in self.has:
            return None
        if name in self.plan.member_of:
            g, off = self.plan.member_of[name]
            return f"{dot(g.name)}[{_plus(off, row)}, {col}]"
        if name in self.plan.reductions:  # one row: the same for every unit
            return f"{dot(name)}[0, {col}]"
        return f"{dot(name)}[{row}, {col}]"

    # -- printing -------------------------------------------------------------
    def _linear(self, g):
        plan = self.plan
        src, cols = g.source, plan.size_of(g.source)
        weights = "; ".join(w for _, w, _, _ in g.members)
        lines = []
        if src in self.has:
            # a lookup's tangent is its group's array, whole (a group of its own)
            src_dot = dot(plan.member_of[src][0].name) if src in plan.member_of else dot(src)
            lines.append(f"np.dot({naming.code_group_weights(g.name)}, {src_dot}, {dot(g.name)})")
            comment = f"{g.name} = {src} @ [{weights}]^T: W {dot(src)} + W_dot {src}"
            op = "+="
        else:  # zeroed once before the loop; the same places are set every step
            comment = f"{g.name} = {src} @ [{weights}]^T: W_dot {src}"
            op = "="
        lines += ["for _b in range(B):", "    _r = _lo + _b", "    _c = _b * NP"]
        if g.lookup:  # W_dot onehot(x_t): a one in column x_t of each row's direction
            (node, weight, size, _), = g.members
            first = f"_c + {naming.code_direction(weight)} + _i*{cols}"
            comment = f"{g.name} = {weight}[:, {src}]: W_dot onehot({src})"
            return StepBlock(comment, lines + [
                f"    _j = {plan.input_arrays[g.source]}[_r]",
                f"    for _i in range({size}):",
                f"        for _v in range({cols}):",
                f"            {dot(g.name)}[_i, {first} + _v] = 0.0",
                f"        {dot(g.name)}[_i, {first} + _j] = 1.0"])
        for node, weight, size, off in g.members:
            if node not in self.has:
                continue
            lines += [f"    for _i in range({size}):",
                      f"        for _j in range({cols}):",
                      f"            {dot(g.name)}[{_plus(off, '_i')}, _c + "
                      f"{naming.code_direction(weight)} + _i*{cols}"
                      f" + _j] {op} {plan.value(src, row='_r', col='_j')}"]
        return StepBlock(comment, lines)

    def _node_lines(self, name, exprs):
        """The lines of one node's tangent at unit _k: its own row _k (row 0, summed
        over the units, for a reduction), sum over arguments of (d node/d arg) arg_dot,
        and the unit directions of its vector parameters."""
        plan = self.plan
        reduction = name in plan.reductions
        row, op = ("0", "+=") if reduction else ("_k", "=")
        terms = self.d.backward.tangent(name)
        exprs.extend(t.expr for t in terms)
        temps, reduced = cse([plan._local_symbols(t.expr) for t in terms],
                             prefix=f"_{name}_")
        body = [f"{v} = {plan.code(e)}" for v, e in temps]
        by_coef, immediate = {}, []
        for t, e in zip(terms, reduced):
            if t.rule == "direction":
                immediate.append(f"{dot(name)}[{row}, _c + {naming.code_direction(t.via)} + _k]"
                                 f" += {plan.code(e)}" + plan.cite("dot", name))
                continue
            if not (e.is_Symbol or e.is_Number):
                coef = naming.code_coefficient(name, t.via)
                body.append(f"{coef} = {plan.code(e)}")
                e = sp.Symbol(coef)
            by_coef.setdefault(e, []).append(self.tangent(t.via, "_k", "_c + _p"))
        # Arguments with one coefficient (the summands of a pre-activation) are
        # summed first: f'(a) (a1_dot + a2_dot), one product per direction.
        terms = []
        for e, summands in by_coef.items():
            total = " + ".join(summands)
            if e == 1:
                terms.append(total)
            else:
                terms.append(f"{plan.code_factor(e)}*" +
                             (f"({total})" if len(summands) > 1 else total))
        if terms or not reduction:
            body += ["for _p in range(NP):",
                     f"    {dot(name)}[{row}, _c + _p] {op} {' + '.join(terms) or '0.0'}"
                     + plan.cite("dot", name)]
        return body + immediate

    def _elementwise(self, block):
        plan = self.plan
        nodes = [n for n in block.nodes if n in self.has]
        body, exprs = [], []
        for name in nodes:
            body += self._node_lines(name, exprs)
        loads = plan._loads(exprs, set())
        lines = ["for _b in range(B):", "    _r = _lo + _b", "    _c = _b * NP",
                 f"    for _k in range({block.size}):"]
        lines += ["        " + line for line in loads + body]
        return StepBlock("fused elementwise: " + ", ".join(nodes)
                         + ": sum over args of (d node/d arg) arg_dot + d node/d bias", lines)

    def _reduction(self, block):
        name, = block.nodes
        exprs = []
        body = self._node_lines(name, exprs)
        loads = self.plan._loads(exprs, set())
        lines = ["for _b in range(B):", "    _r = _lo + _b", "    _c = _b * NP",
                 "    for _p in range(NP):", f"        {dot(name)}[0, _c + _p] = 0.0",
                 f"    for _k in range({block.size}):"]
        lines += ["        " + line for line in loads + body]
        return StepBlock(f"reduction {name}: sum over the {block.size} units of (d summand/d "
                         "arg) arg_dot + d summand/d bias", lines)

    def read_by_readout(self):
        """Loop vectors the post phase reads: where the losses meet the sensitivities."""
        reads = set()
        for n in self.d.nodes:
            if n.phase == "post":
                reads.update([n.source] if n.kind == "linear" else n.args)
        # A vector with no tangent (a state whose update reads nothing that has one)
        # adds nothing to grad.
        return [n.name for n in self.d.nodes
                if n.phase == "loop" and n.name in reads and n.name in self.has]

    def _gradient(self):
        plan = self.plan
        names = self.read_by_readout()
        lines = ["for _b in range(B):", "    _r = _lo + _b", "    _c = _b * NP"]
        for name in names:
            lines += [f"    for _k in range({plan.size_of(name)}):",
                      f"        _a = {plan.adjoint(name, row='_r', col='_k')}",
                      "        if _a != 0.0:",
                      "            for _p in range(NP):",
                      f"                grad[_p] += _a*{self.tangent(name, '_k', '_c + _p')}"]
        adjoints = ", ".join(f"dl/d{n}" for n in names)
        return StepBlock(f"grad += ({adjoints}) . tangent: this step's losses through the "
                         "sensitivities", lines)

    def _size_expr(self, code):
        """A size code ("4*H") as an expression; size names are symbols, even those
        SymPy would read as constants (I, E, O, S)."""
        return sp.sympify(code, locals={s: sp.Symbol(s) for s in self.d.sizes})

    # -- for the template -----------------------------------------------------
    def context(self):
        init = [f"NP = {_code(self.np)}"]
        init += [f"{naming.code_direction(x.param)} = {_code(x.first)}" for x in self.directions]
        init += [f"{dot(g.name)}[:, :] = 0.0" for g in self.groups if g.source not in self.has]
        # A state without a tangent carries zeros to the next step (and out of rtrl()).
        init += [f"{dot(s.name)}[:, :] = 0.0" for s in self.d.states if s.name not in self.has]
        return dict(
            params=repr(tuple(x.param for x in self.directions)),
            directions=[dict(param=x.param, first=_code(x.first), count=_code(x.count),
                             shape=repr(tuple(x.shape)).replace("'", ""))
                        for x in self.directions],
            np=_code(self.np),
            tangents=[dict(name=n, rows=r, state=self._carried.get(n))
                      for n, r in self.tangents],
            rows=_code(sum((self._size_expr(r) for _, r in self.tangents), sp.S.Zero)),
            init=init,
            blocks=self.blocks,
            states=[dict(name=s.name, prev=s.prev, size=s.size) for s in self.d.states],
        )


def _code(expr):
    """A size expression as Python integer arithmetic (H*I + H**2)."""
    return str(sp.sympify(expr))


def _plus(offset, index):
    return index if offset == "0" else f"{offset} + {index}"
