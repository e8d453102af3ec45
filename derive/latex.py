"""Print a Derivation as the derivation a reader checks the generated code against.

Data flow: derivation.py (Derivation) -> this module -> a LaTeX document, a fragment
of equations to paste into a paper, or GitHub Markdown. Nothing here is written per
model: every right-hand side is a SymPy expression of the Derivation (node
expressions, the sums of ``Derivation.backward``, the loss error, the L2 terms)
printed by ``DerivationPrinter``, a ``LatexPrinter`` subclass; symbols come from
naming.py, whose code names the generated kernels use.

    from bpttgen.derive import derive
    from bpttgen.derive.latex import render
    from bpttgen.derive.models import build
    print(render(derive(build("elman")), form="markdown"))

The content, in order: notation; the forward step and the readout; the loss; the
output error; the accumulated adjoint recurrence, node by node in reverse order;
the parameter gradients; the L2 terms; the SGD update; the algorithms (naive,
accumulated, truncated); RTRL's forward recurrence and tangents; the ARTBP estimator;
optionally every equation again per element. Each
equation is numbered; the three forms hold the same equations in the same order.
"""

import re
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache

import sympy as sp
from sympy.core.sorting import default_sort_key
from sympy.printing.latex import LatexPrinter

from . import functions, naming, plaintext
from .backward import W_ELEM
from .losses import K as LOSS_K, m as LOSS_M

FORMS = ("document", "fragment", "markdown", "text")

#: Width, in printed symbols, above which a sum is broken over lines in LaTeX.
LINE_WIDTH = 40


# -- the printer ---------------------------------------------------------------------

class DerivationPrinter(LatexPrinter):
    """SymPy's LaTeX printer over the element symbols of a Derivation.

    ``symbols`` maps a symbol name to its LaTeX (a vector x_t, an element x_{t,j}, or a
    pre-printed atom such as W^T \\bar{a}); ``vectors`` names the vector-valued ones,
    whose products print as Hadamard products when ``hadamard`` is set; ``compound``
    names atoms that need parentheses inside a product or a power; ``ranks`` orders
    terms and factors as the model defines them (inputs, then nodes, ...).

    >>> h, a = sp.symbols("h a")
    >>> p = DerivationPrinter({"symbols": {"h": r"\\mathbf{h}_{t}", "a": r"\\mathbf{a}_{t}"},
    ...                        "vectors": {"h", "a"}, "ranks": {"a": 0, "h": 1}})
    >>> p.doprint(a * (1 - h**2))
    '\\\\mathbf{a}_{t} \\\\odot \\\\left(1 - \\\\mathbf{h}_{t}^{2}\\\\right)'
    >>> p.doprint(functions.sigmoid(a))
    '\\\\sigma{\\\\left(\\\\mathbf{a}_{t} \\\\right)}'
    """

    _default_settings = dict(LatexPrinter._default_settings, symbols={}, vectors=frozenset(),
                             compound=frozenset(), ranks={}, hadamard=True,
                             prefix=frozenset())

    #: Functions of derive.functions (and any user function of the same name).
    FUNCTIONS = {
        "sigmoid": r"\sigma",
        "softplus": r"\operatorname{softplus}",
        "relu": r"\operatorname{relu}",
        "step": r"\operatorname{step}",
    }

    def _print_Symbol(self, expr, style="plain"):
        tex = self._settings["symbols"].get(expr.name)
        return tex if tex is not None else super()._print_Symbol(expr, style)

    def _hprint_Function(self, func):
        return self.FUNCTIONS.get(func) or super()._hprint_Function(func)

    # -- order: as defined, positive terms first --------------------------------
    def _rank(self, expr):
        ranks = self._settings["ranks"]
        names = [s.name for s in expr.free_symbols]
        return min((ranks.get(n, 10 ** 6) for n in names), default=-10 ** 6)

    def _as_ordered_terms(self, expr, order=None):
        def key(term):
            negative = term.as_coeff_Mul()[0].is_negative
            return (bool(negative), self._rank(term), default_sort_key(term))
        return sorted(sp.Add.make_args(expr), key=key)

    # -- parentheses around pre-printed compound atoms --------------------------
    def _is_compound(self, expr):
        return expr.is_Symbol and expr.name in self._settings["compound"]

    def _needs_mul_brackets(self, expr, first=False, last=False):
        return self._is_compound(expr) or super()._needs_mul_brackets(expr, first, last)

    def _print_Pow(self, expr):
        if self._is_compound(expr.base) and not expr.exp.is_negative:
            return r"\left(%s\right)^{%s}" % (self._print(expr.base), self._print(expr.exp))
        return super()._print_Pow(expr)

    # -- products: Hadamard between vectors -------------------------------------
    def _is_vector(self, expr):
        return any(s.name in self._settings["vectors"] for s in expr.free_symbols)

    def _print_Mul(self, expr):
        if not self._is_vector(expr):
            return super()._print_Mul(expr)
        coeff, rest = expr.as_coeff_Mul()
        if coeff.is_negative:
            return "- " + self._print(-expr)
        scalars, vectors, vector_den, prefix = [coeff], [], [], ""
        for f in sp.Mul.make_args(rest):
            if f.is_Symbol and f.name in self._settings["prefix"]:
                prefix += self._print(f) + " "
            elif not self._is_vector(f):
                scalars.append(f)
            elif f.is_Pow and f.exp.is_number and f.exp.is_negative:
                vector_den.append(sp.Pow(f.base, -f.exp))
            else:
                vectors.append(f)
        sep = r" \odot " if self._settings["hadamard"] else " "
        key = lambda f: (self._rank(f), default_sort_key(f))  # noqa: E731
        vectors.sort(key=key)
        vector_den.sort(key=key)
        scalar_num, scalar_den = sp.fraction(sp.Mul(*scalars))
        if self._settings["hadamard"] and not vector_den:
            # Vector form: the scalar factor in front, \frac{w}{N} (y - d).
            tex = sep.join(self._factor(f) for f in vectors)
            scalar = scalar_num / scalar_den
            if scalar == 1:
                return prefix + tex
            scalar_tex = self._print(scalar)
            if scalar.is_Add:
                scalar_tex = r"\left(%s\right)" % scalar_tex
            return f"{prefix}{scalar_tex} {tex}"
        # Index form, or a vector denominator: one fraction. A part that is a single
        # factor needs no parentheses: \frac{y - d}{O}.
        num = self._part([scalar_num] if scalar_num != 1 else [], vectors, sep)
        if scalar_den == 1 and not vector_den:
            return prefix + num
        den = self._part([scalar_den] if scalar_den != 1 else [], vector_den, sep)
        return prefix + r"\frac{%s}{%s}" % (num, den)

    def _part(self, scalars, vectors, sep):
        if not scalars and not vectors:
            return "1"
        if len(scalars) + len(vectors) == 1:
            return self._print((scalars + vectors)[0])
        tex = sep.join(self._factor(f) for f in vectors)
        if not scalars:
            return tex
        s = self._print(scalars[0])
        return (r"\left(%s\right)" % s if scalars[0].is_Add else s) + " " + tex

    def _factor(self, f):
        tex = self._print(f)
        if f.is_Add or self._is_compound(f):
            return r"\left(%s\right)" % tex
        return tex


# -- the document model --------------------------------------------------------------

@dataclass
class Eq:
    """One numbered equation: ``lhs rel pieces`` where a piece after the first starts
    with '+ ' or '- ' and is a place a long line may break."""

    key: str
    lhs: str
    pieces: list
    rel: str = "="
    number: int = 0
    label: str = ""

    def body(self):
        return f"{self.lhs} {self.rel} {' '.join(self.pieces)}"


@dataclass
class Block:
    kind: str  # "section" | "text" | "table" | "eqs"
    text: str = ""
    rows: list = field(default_factory=list)
    eqs: list = field(default_factory=list)


def _sup(tex, script):
    """tex^{script}, braced when tex already has a superscript (h^{(1)}_t)."""
    return ("{%s}^{%s}" if "^" in tex else "%s^{%s}") % (tex, script)


class _Builder:
    """Walks a Derivation once and lays out the blocks every form prints."""

    def __init__(self, derivation, index_form):
        self.d = derivation
        self.names = naming.LatexNames(derivation)
        self.index_form = index_form
        self.blocks = []
        self.keys = {}
        self.states = {s.name: s for s in derivation.states}
        self.prevs = {s.prev: s for s in derivation.states}
        self.loss_node = derivation.loss.node
        self.vec = self._printer("vector")
        self.idx = self._printer("index")
        self.loss_idx = self._printer("index", loss=True)
        self.loss_vec = self._printer("vector", loss=True)

    # -- symbols -----------------------------------------------------------------
    def _printer(self, mode, loss=False):
        d, n = self.d, self.names
        vector = mode == "vector"
        symbols, vectors, compound, ranks = {}, set(), set(), {}
        ids = [*d.input_names, *(x.name for x in d.nodes), *self.prevs,
               *(p.name for p in d.params if p.kind == "vector")]
        for i, name in enumerate(ids):
            symbols[name] = n.vector(name) if vector else n.element(name)
            if name not in n.reductions:  # one number per row: a scalar factor
                vectors.add(name)
            ranks[name] = i
            if name in n.linear and not n.linear[name].lookup:  # E_{:,x_t} is one symbol
                compound.add(name)
        adjointed = [x.name for x in d.nodes] + list(self.prevs)
        for i, name in enumerate(adjointed):
            symbols[f"bar:{name}"] = n.adjoint(name) if vector else n.adjoint_element(name)
            if name not in n.reductions:
                vectors.add(f"bar:{name}")
            ranks[f"bar:{name}"] = -1000 + i
        for s in d.states:
            # the adjoint of s_prev computed at the step that reads it: t+1 (t-1 reverse)
            later = -n.step(s.name)
            symbols[f"carry:{s.name}"] = (n.adjoint(s.prev, later) if vector else
                                          n.adjoint_element(s.prev, offset=later))
            vectors.add(f"carry:{s.name}")
        j, k = n.index, n.sum_index
        for node in n.linear.values():
            if node.lookup:  # E onehot(x_t): the adjoint goes to column x_t of the table
                token = n.vector(node.source)
                symbols[f"outer:{node.name}"] = (
                    n.adjoint(node.name) + " " + _sup(rf"\operatorname{{onehot}}({token})",
                                                      r"\top")
                    if vector else n.adjoint_element(node.name, j) + f" [{k} = {token}]")
            elif vector:
                symbols[f"WT:{node.name}"] = (_sup(n.matrix(node.weight), r"\top") + " "
                                              + n.adjoint(node.name))
                symbols[f"outer:{node.name}"] = (n.adjoint(node.name) + " "
                                                 + _sup(n.vector(node.source), r"\top"))
            else:
                symbols[f"WT:{node.name}"] = (rf"\sum_{{{k}}} "
                                              + n.matrix_element(node.weight, k, j) + " "
                                              + n.adjoint_element(node.name, k))
                symbols[f"outer:{node.name}"] = (n.adjoint_element(node.name, j) + " "
                                                 + n.element(node.source, k))
            vectors.add(f"WT:{node.name}")
            compound.add(f"WT:{node.name}")
        for p in d.params:
            if p.kind == "matrix":
                symbols[f"mat:{p.name}"] = (n.matrix(p.name) if vector else
                                            n.matrix_element(p.name, j, k))
        # RTRL's tangents: a dot over a vector; a product's is W v_dot + W_dot v.
        bw = d.backward
        for name in bw.tangent_vectors + bw.directions:
            if name in n.linear:
                pieces = [(n.matrix(t.weight) + n.tangent(t.via)) if t.rule == "product"
                          else (n.tangent(t.weight) + n.vector(t.source))
                          if not n.linear[name].lookup else n.tangent(name)
                          for t in bw.tangent(name)]
                tex = " + ".join(pieces)
                if len(pieces) > 1:
                    compound.add(f"dot:{name}")
            else:
                tex = n.tangent(name)
            symbols[f"dot:{name}"] = tex
            if name not in n.reductions:
                vectors.add(f"dot:{name}")
            ranks[f"dot:{name}"] = 2000 + ranks.get(name, 0)
        # sizes are numbers (a mean's divisor)
        symbols.update({x: naming.size(x) for x in d.sizes})
        symbols.update({"w:tb": "w_{tb}", "N:norm": "N",
                        "iv:k1": r"[t > \tau - k_1]", "iv:tau": r"[t < \tau]",
                        "iv:kappa": r"\kappa_{t+1}"})
        if loss:
            # The loss's own symbols: readout z, target d, prediction y, shift m, sums.
            out = naming.size(d.loss.size)
            for i, (name, tex) in enumerate((("y", r"\mathbf{y}"), ("d", r"\mathbf{d}"),
                                             ("z", r"\mathbf{z}"))):
                symbols[name] = f"{tex}_{{t}}" if vector else f"{name}_{{t,{j}}}"
                vectors.add(name)
                ranks[name] = i
            symbols[LOSS_M.name] = "m_{t}"
            symbols[LOSS_K.name] = out
            for sym, _ in d.loss.loss.sums:
                symbols[sym.name] = naming.plain(sym.name, "t")
                vectors.discard(sym.name)
        return DerivationPrinter({"symbols": symbols, "vectors": frozenset(vectors),
                                  "compound": frozenset(compound), "ranks": ranks,
                                  "hadamard": vector,
                                  "prefix": frozenset({"iv:k1", "iv:tau", "iv:kappa"})})

    # -- blocks --------------------------------------------------------------------
    def section(self, title):
        self.blocks.append(Block("section", text=title))

    def text(self, markup):
        self.blocks.append(Block("text", text=markup))

    def eqs(self, *eqs):
        eqs = [e for e in eqs if e is not None]
        if eqs:
            self.blocks.append(Block("eqs", eqs=list(eqs)))

    def eq(self, key, lhs, pieces, rel="="):
        if key in self.keys:
            raise ValueError(f"duplicate equation key {key!r}")
        e = Eq(key, lhs, pieces if isinstance(pieces, list) else [pieces], rel)
        self.keys[key] = e
        return e

    @staticmethod
    def terms(printer, exprs):
        """Printed terms of a sum, with their signs, in the given order."""
        pieces = []
        for e in exprs:
            e = sp.sympify(e)
            negative = e.as_coeff_Mul()[0].is_negative
            tex = printer.doprint(-e if negative else e)
            if (-e if negative else e).is_Add:
                tex = r"\left(%s\right)" % tex
            sign = "- " if negative else ("+ " if pieces else "")
            pieces.append(sign + tex)
        return pieces or ["0"]

    def expr_pieces(self, printer, expr):
        """A right-hand side split at its top-level sum, in the printer's order."""
        if isinstance(expr, sp.Add):
            return self.terms(printer, printer._as_ordered_terms(expr))
        return [printer.doprint(expr)]

    # -- the walk ------------------------------------------------------------------
    def build(self):
        self.notation()
        self.forward()
        self.loss()
        self.error()
        self.backward()
        self.gradients()
        self.l2()
        self.update()
        self.algorithms()
        if not self.d.bidirectional:  # online algorithms: refused for a reverse state
            self.rtrl()
            self.artbp()
        if self.index_form:
            self.per_element()
        return self.blocks

    def _list(self, names, render):
        return ", ".join(f"${render(x)}$" for x in names)

    def _functions_used(self):
        exprs = [n.expr for n in self.d.nodes if n.expr is not None]
        exprs += [t.expr for t in self.d.backward.terms if t.rule == "local"]
        exprs += [s for _, s in self.d.loss.loss.sums] + [self.d.loss.loss.prediction]
        used = {}
        for e in exprs:
            for f in sp.sympify(e).atoms(sp.Function):
                if not type(f).__module__.startswith("sympy."):
                    used.setdefault(type(f).__name__, type(f))
        return [used[k] for k in sorted(used)]

    def notation(self):
        d, n = self.d, self.names
        self.section("Notation")
        size = lambda name: f"${naming.size(name)}$"  # noqa: E731
        rows = [(n.vector(name), name, "input at step $t$", size(input_size))
                for name, input_size in d.inputs]
        if len(rows) > 1:  # the call's x holds them side by side, in this order
            rows = [(symbol, name, f"input {i} of {len(rows)} at step $t$", width)
                    for i, (symbol, name, _, width) in enumerate(rows, 1)]
        if d.tokens:
            ((name, vocab),) = d.inputs
            rows = [(n.vector(name), name, "input token at step $t$, an integer in "
                     f"$[0, {naming.size(vocab)})$", "integer")]
        for s in d.states:
            rows.append((n.vector(s.name), s.name,
                         f"recurrent state; ${n.initial(s.name)}$ is given", size(s.size)))
            rows.append((n.vector(s.prev), s.prev,
                         "the state after step $t$ (the reverse direction runs from $t = T-1$ "
                         "down to 0)" if s.reverse else "the state before step $t$",
                         size(s.size)))
        where = {"pre": "that reads no state (computed for all $t$ before the time loop)",
                 "loop": "of the recurrent step", "post": "of the readout"}
        for node in d.nodes:
            if node.kind == "elementwise" and node.name not in self.states \
                    and node.name != self.loss_node:
                rows.append((n.vector(node.name), node.name,
                             f"vector {where[node.phase]}", size(node.size)))
            elif node.kind == "reduction":
                rows.append((n.vector(node.name), node.name,
                             f"sum over the ${naming.size(node.over)}$ units of a vector, one "
                             f"number per sequence, {where[node.phase]}", "scalar"))
        out = size(d.loss.size)
        rows.append((n.vector(self.loss_node), self.loss_node,
                     "readout, the input of the loss", out))
        rows.append((r"\mathbf{y}_{t}", "y", "prediction, @eq{loss:prediction}", out))
        target = (f"one-hot target of the class ${n.target_class}_t$"
                  if d.loss.loss.target == "index" else "target")
        rows.append((r"\mathbf{d}_{t}", "d", target, out))
        meaning = {"weight": "weight matrix", "bias": "bias vector",
                   "gain": "gain of a normalisation, multiplied elementwise",
                   "diagonal": "diagonal weight, multiplied elementwise"}
        for p in d.params:
            shape = "$" + r" \times ".join(naming.size(s) for s in p.shape) + "$"
            rows.append((n.matrix(p.name), p.name, meaning.get(p.role, p.role), shape))
        for s in d.states:
            code = naming.code_adjoint(s.name, self.states)
            rows.append((n.adjoint(s.name), code,
                         rf"accumulated adjoint $\partial L / \partial {n.vector(s.name)}$",
                         size(s.size)))
            if self.consumers(s.prev):
                rows.append((n.adjoint(s.prev), code,
                             f"adjoint of ${n.vector(s.prev)}$ through step $t$, added "
                             f"into ${n.adjoint(s.name, n.step(s.name))}$", size(s.size)))
        group = naming.code_group("<u>")
        rows.append((r"\bar{\mathbf{v}}_{t}", naming.code_adjoint("<v>", ()),
                     r"adjoint $\partial L / \partial \mathbf{v}_t$ of another vector "
                     r"$\mathbf{v}$. The products $\mathbf{W}\mathbf{u}_{t}$ of one vector "
                     rf"$\mathbf{{u}}$ are one matrix product in code, `{group}`, with "
                     f"the weights stacked in `{naming.code_group_weights(group)}`; their "
                     rf"adjoints $\overline{{\mathbf{{W}}\mathbf{{u}}_{{t}}}}$ are columns "
                     f"of `{naming.code_adjoint(group, ())}`", r"as $\mathbf{v}$"))
        rows.append((r"\partial L / \partial \boldsymbol{\theta}",
                     naming.code_gradient("<theta>"),
                     r"gradient of a vector parameter $\boldsymbol{\theta}$; of a matrix: "
                     f"its rows of `{naming.code_group_gradient(group)}`",
                     r"as $\boldsymbol{\theta}$"))
        rows.append(("w_{tb}", "mask", "weight of the loss at step $t$ of sequence $b$",
                     "scalar"))
        rows.append((r"\lambda,\ \eta", "l2, lr", "L2 coefficient, learning rate", "scalar"))
        rows.append(("T,\\ B", "T, B", "sequence length, batch size", "scalar"))
        self.blocks.append(Block("table", rows=rows))
        defs = []
        for f in self._functions_used():
            a = sp.Symbol("a", real=True)
            definition = self._definition(f, a)
            if definition is not None:
                p = DerivationPrinter({"symbols": {"iv:positive": "[a > 0]"}})
                defs.append(f"${p.doprint(f(a))} = {p.doprint(definition)}$")
        self.text(
            "Bold symbols are vectors of one sequence $b$ of the batch; $b$ is written only "
            "in sums over the batch. A product $\\mathbf{W}\\mathbf{v}$ of a matrix and a "
            "vector is a matrix-vector product; $\\odot$ is the elementwise (Hadamard) "
            "product, and powers, quotients and functions of vectors act elementwise"
            + ("; here " + ", ".join(defs) if defs else "") + ". The code column is the "
            "name the generated kernels use for the same quantity.")

    @staticmethod
    def _definition(f, a):
        """f(a) in elementary functions, from the function's own rewrite rules."""
        for target in (sp.exp, sp.Max):
            rewritten = f(a).rewrite(target)
            if rewritten != f(a):
                return rewritten
        if f is functions.step:
            return sp.Symbol("iv:positive")  # an Iverson bracket: 1 where a > 0, else 0
        return None

    def _node_eq(self, node, printer, form):
        lhs = (self.names.vector(node.name) if form == "vector" else
               self.names.element(node.name))
        key = naming.equation_key("fwd", node.name, form)
        if node.kind == "reduction":  # element by element in both forms: a sum over j
            # the summand's terms (a constant factor taken in) are places to break a line
            pieces = self.expr_pieces(self.idx, sp.expand_mul(node.expr, deep=False))
            pieces[0] = self._unit_sum(node.over, r"\bigl(" + pieces[0], False)
            pieces[-1] += r"\bigr)"
            if len(pieces) == 1:
                pieces = [self._unit_sum(node.over, self.idx.doprint(node.expr), False)]
            return self.eq(key, lhs, pieces)
        return self.eq(key, lhs, self.expr_pieces(printer, node.expr))

    def _unit_sum(self, size, tex, compound):
        """sum_{j=1}^{size} of an element's expression, bracketed where a sum."""
        j = self.names.index
        return rf"\sum_{{{j}=1}}^{{{naming.size(size)}}} " + \
            (r"\left(%s\right)" % tex if compound else tex)

    def forward(self):
        d, n = self.d, self.names
        self.section("Forward step")
        hoisted = [x.name for x in d.phase_nodes("pre")]
        text = ("One step maps the input" + ("s " if len(d.inputs) > 1 else " ")
                + self._list(d.input_names, n.vector) + " and the previous "
                "states " + self._list([s.prev for s in d.states], n.vector)
                + " to the new states " + self._list([s.name for s in d.states], n.vector)
                + ".")
        if hoisted:
            text += (" What reads no state is computed for all steps at once before the "
                     "time loop: " + self._list(hoisted, n.vector) + ".")
        self.text(text)
        step = [x for x in d.nodes if x.kind != "linear" and x.phase != "post"]
        self.eqs(*(self._node_eq(x, self.vec, "vector") for x in step))
        post = [x for x in d.nodes if x.kind != "linear" and x.phase == "post"]
        self.text("The readout, after the time loop, for all steps at once:")
        self.eqs(*(self._node_eq(x, self.vec, "vector") for x in post))

    def loss(self):
        d = self.d
        loss, p = d.loss.loss, self.loss_idx
        j = self.names.index
        out = naming.size(d.loss.size)
        self.section("Loss")
        description = f" ({loss.description})" if loss.description else ""
        self.text(f"The loss of step $t$ is `{loss.name}`{description}, a function of sums "
                  f"over the ${out}$ output units:")
        eqs = [self.eq("loss:value", "l_{t}", self.expr_pieces(p, loss.value))]
        for sym, summand in loss.sums:
            tex = p.doprint(summand)
            if summand.is_Add:
                tex = r"\left(%s\right)" % tex
            eqs.append(self.eq(f"loss:sum:{sym.name}", p.doprint(sym),
                               rf"\sum_{{{j}=1}}^{{{out}}} {tex}"))
        used = loss.value.free_symbols | loss.prediction.free_symbols
        for _, summand in loss.sums:
            used |= summand.free_symbols
        if LOSS_M in used:
            eqs.append(self.eq("loss:shift", "m_{t}", rf"\max_{{{j}}} z_{{t,{j}}}"))
        eqs.append(self.eq("loss:prediction", f"y_{{t,{j}}}",
                           self.expr_pieces(p, loss.prediction)))
        self.eqs(*eqs)
        text = ("The shift $m_t$ keeps the exponentials in range; the loss does not "
                "depend on it, and it is held constant when differentiating. "
                if LOSS_M in used else "")
        if loss.target == "index":
            c = self.names.target_class
            text += (f"The target is a class ${c}_t$ per step, $d_{{t,{j}}} = 1$ for "
                     f"${j} = {c}_t$ and 0 otherwise. ")
        text += ("Over the batch, each step's loss $l_{tb}$ is weighted by the mask "
                 "$w_{tb}$ (1 by default")
        text += (", and 0 for every $t < T$: this model has a loss at the last step only"
                 if d.loss.at == "last" else "")
        text += ") and the weighted sum is normalised by the total weight:"
        self.text(text)
        sums = r"\sum_{b=1}^{B} \sum_{t=1}^{T}"
        self.eqs(self.eq("loss:total", "L", [rf"\frac{{1}}{{N}} {sums} w_{{tb}} l_{{tb}}",
                                             "+ R"]),
                 self.eq("loss:norm", "N", rf"{sums} w_{{tb}}"))
        self.text("where $R$ is the L2 penalty of @eq{l2:penalty}.")

    def _simple_error(self):
        """The error with common factors cancelled, (2y - 2d)/(2K) -> (y - d)/K, where
        that is shorter; the same value as LossInfo.error."""
        error = self.d.loss.error
        factored = sp.factor(error)
        return factored if sp.count_ops(factored) < sp.count_ops(error) else error

    def _error_expr(self, truncated=False):
        w = sp.Symbol("w:tb") * sp.Symbol("iv:k1") if truncated else sp.Symbol("w:tb")
        return w / sp.Symbol("N:norm") * self._simple_error()

    def error(self):
        d, n = self.d, self.names
        j = n.index
        p = self.loss_idx
        self.section("Output error")
        raw, error = d.loss.loss.raw_error(), d.loss.error
        pieces = [p.doprint(raw)]
        for form in (error, self._simple_error()):
            if p.doprint(form) not in (x.lstrip("= ") for x in pieces):
                pieces.append("= " + p.doprint(form))
        self.text("The derivative of the step's loss with respect to the readout, from "
                  "SymPy, simplifies through the prediction $y_{t," + j + "}$ of "
                  "@eq{loss:prediction}:")
        self.eqs(self.eq("error:element", rf"\frac{{\partial l_t}}{{\partial z_{{t,{j}}}}}",
                         pieces))
        self.text("With the mask and the normalisation of @eq{loss:total}, the adjoint of "
                  "the readout, where the backward sweep starts, is")
        self.eqs(self.eq("error", n.adjoint(self.loss_node),
                         self.expr_pieces(self.loss_vec, self._error_expr())))

    # -- backward ------------------------------------------------------------------
    def consumers(self, name):
        """Contributions to the adjoint of ``name``, in forward order."""
        return self.d.backward.consumers(name)

    @staticmethod
    def _summand(term):
        """A Term of backward.py as the expression this printer prints (a sum over the
        units, of a Term into a reduction, is added by adjoint_eq)."""
        if term.rule == "transpose":
            return sp.Symbol(f"WT:{term.via}")
        if term.rule == "outer":
            return sp.Symbol(f"outer:{term.via}")
        return sp.Symbol(f"bar:{term.via}") * term.expr

    def adjoint_terms(self, name, truncated=False, reweighted=False):
        """bar(name) but the output error (printed apart, adjoint_eq)."""
        terms = []
        for term in self.d.backward.adjoint(name):
            if term.rule == "carry":
                carry = sp.Symbol(f"carry:{name}")
                factor = "iv:tau" if truncated else "iv:kappa" if reweighted else None
                terms.append(sp.Symbol(factor) * carry if factor else carry)
            elif term.rule != "error":
                terms.append(self._summand(term))
        return terms

    def adjoint_eq(self, name, form, truncated=False, reweighted=False):
        printer = self.vec if form == "vector" else self.idx
        lhs = (self.names.adjoint(name) if form == "vector" else
               self.names.adjoint_element(name))
        pieces = self.terms(printer, self.adjoint_terms(name, truncated, reweighted))
        if name in self.names.reductions:
            pieces = self._summed(pieces, [t for t in self.d.backward.adjoint(name)], form)
        if name == self.loss_node:
            # A readout that other nodes read too: the output error plus their share.
            error = self.terms(self.loss_vec if form == "vector" else self.loss_idx,
                               [self._error_expr(truncated)])
            pieces = error + [p if p.startswith("- ") else "+ " + p for p in pieces]
        variant = ":trunc" if truncated else ":artbp" if reweighted else ""
        key = naming.equation_key("adj", name, form) + variant
        return self.eq(key, lhs, pieces)

    def _summed(self, pieces, terms, form):
        """The printed terms of a reduction's adjoint (or tangent), each a sum over the
        units of the node it comes from: 1^T v in vector form, sum_j v_j per element."""
        out = []
        for piece, term in zip(pieces, terms):
            sign = piece[:2] if piece[:2] in ("+ ", "- ") else ""
            body = piece[len(sign):]
            node = term.via if term.rule == "local" and term.target in self.names.reductions \
                else term.target
            if form == "vector":  # 1^T (a ⊙ b): brackets, or it reads (1^T a) ⊙ b
                bracket = not body.startswith(r"\left(")
                out.append(sign + r"\mathbf{1}^{\top} " +
                           (r"\left(%s\right)" % body if bracket else body))
            else:  # a sum is already bracketed by terms()
                out.append(sign + self._unit_sum(self.d.units_of(node), body, False))
        return out

    def backward(self):
        d, n = self.d, self.names
        self.section("Backward step: the accumulated recurrence")
        self.text(
            "Write $\\mathbf{s}_t$ for all states of step $t$ together and "
            "$\\mathbf{J}_{t+1} = \\partial \\mathbf{s}_{t+1} / \\partial \\mathbf{s}_t$. "
            "The adjoint $\\boldsymbol{\\delta}_t = \\partial L / \\partial \\mathbf{s}_t$ "
            "collects the loss of step $t$ and, through step $t+1$, every later loss:")
        self.eqs(self.eq("acc", r"\boldsymbol{\delta}_{t}",
                         [r"\frac{\partial l_{t}}{\partial \mathbf{s}_{t}}",
                          r"+ \mathbf{J}_{t+1}^{\top} \boldsymbol{\delta}_{t+1}"]))
        carries = [f"${n.adjoint(s.prev, -n.step(s.name))}$" for s in d.states
                   if self.consumers(s.prev) and not s.reverse]
        reverse = [s for s in d.states if s.reverse and self.consumers(s.prev)]
        self.text(
            "where $l_t$ stands for the weighted term $w_{tb} l_{tb} / N$. One sweep, "
            "$t = T, \\dots, 1$, evaluates it in $O(T)$. At step $t$ the adjoints are "
            "computed node by node in reverse order of the forward step, each the sum of "
            "the contributions of the vectors that read it: an elementwise "
            "$\\mathbf{u} = f(\\mathbf{a}, \\dots)$ contributes $\\bar{\\mathbf{u}} \\odot "
            "\\partial f / \\partial \\mathbf{a}$ (the local derivatives, from "
            "`sympy.diff` and simplified through stored values), a product "
            "$\\mathbf{W}\\mathbf{a}$ contributes $\\mathbf{W}^{\\top} "
            "\\overline{\\mathbf{W}\\mathbf{a}}$. The sweep starts from "
            "$" + n.adjoint(self.loss_node) + "$ of @eq{error}"
            + (". A reduction $r = \\sum_{j} f(a_{j}, \\dots)$, one number per sequence, "
               "gives each unit $\\bar{r} \\partial f / \\partial a_{j}$, and its own "
               "adjoint sums the contributions of the vectors that read it over their "
               "units: $\\mathbf{1}^{\\top} \\mathbf{v}$ is the sum of the units of "
               "$\\mathbf{v}$" if n.reductions else "")
            + ((". The carries " + ", ".join(carries) + " are the blocks of "
                "$\\mathbf{J}_{t+1}^{\\top}\\boldsymbol{\\delta}_{t+1}$, the adjoints of "
                "the previous states computed at step $t+1$ (last equations below); they "
                "are zero at $t = T$") if carries else "") + "."
            + ((" A reverse state runs from $t = T-1$ down to 0: its previous value is "
                "the one of step $t+1$, so its recurrence runs the other way, forward in "
                "time, $t = 1, \\dots, T$: its carries "
                + ", ".join(f"${n.adjoint(s.prev, -n.step(s.name))}$" for s in reverse)
                + " are the adjoints of its previous value computed at step $t-1$, zero "
                "at $t = 1$. The sweeps of the two directions are independent of each "
                "other; both start from the readout's adjoints.") if reverse else ""))
        eqs = []
        for name in self.d.backward.sweep:
            if name == self.loss_node and not self.adjoint_terms(name):
                continue  # its adjoint is the output error
            eqs.append(self.adjoint_eq(name, "vector"))
        self.eqs(*eqs)

    # -- gradients -----------------------------------------------------------------
    def gradient_terms(self, param):
        return [self._summand(t) for t in self.d.backward.gradient(param.name)]

    def gradient_eq(self, param, form):
        printer = self.vec if form == "vector" else self.idx
        n = self.names
        pieces = self.terms(printer, self.gradient_terms(param))
        sums = r"\sum_{b=1}^{B} \sum_{t=1}^{T} "
        if len(pieces) > 1:
            pieces[0] = sums + r"\bigl(" + pieces[0]
            pieces[-1] += r"\bigr)"
        else:
            pieces[0] = sums + pieces[0]
        if param.role == "weight":
            reg = self.d.l2_gradient.subs(W_ELEM, sp.Symbol(f"mat:{param.name}"))
            term = self.terms(printer, [reg])[0]
            pieces.append(term if term.startswith("- ") else "+ " + term)
        if form == "vector":
            lhs = n.gradient(param.name)
        elif param.kind == "matrix":
            lhs = n.gradient_element(param.name, n.index, n.sum_index)
        else:
            lhs = n.gradient_element(param.name, n.index)
        return self.eq(naming.equation_key("grad", param.name, form), lhs, pieces)

    def gradients(self):
        self.section("Parameter gradients")
        self.text("Parameters are shared by all steps, so each gradient sums the local "
                  "contributions over the steps and the sequences of the batch: outer "
                  "products of adjoints and inputs for a matrix, elementwise sums for a "
                  "vector. Weight matrices add the L2 term of @eq{l2:gradient}.")
        self.eqs(*(self.gradient_eq(p, "vector") for p in self.d.params))

    def l2(self):
        d, n = self.d, self.names
        weights = [p.name for p in d.params if p.role == "weight"]
        self.section("L2 regularisation")
        self.text("The penalty sums over the elements of the weight matrices "
                  + self._list(weights, n.matrix) + "; biases and diagonal weights are "
                  "not penalised:")
        elem = sp.Symbol("w:elem")
        p = DerivationPrinter({"symbols": {"w:elem": f"W_{{{n.index}{n.sum_index}}}"}})
        self.eqs(
            self.eq("l2:penalty", "R",
                    rf"\sum_{{\mathbf{{W}}}} \sum_{{{n.index},{n.sum_index}}} "
                    + p.doprint(d.l2_penalty.subs(W_ELEM, elem))),
            self.eq("l2:gradient", rf"\frac{{\partial R}}{{\partial W_{{{n.index}{n.sum_index}}}}}",
                    p.doprint(d.l2_gradient.subs(W_ELEM, elem))))

    def update(self):
        n = self.names
        self.section("Update rule")
        self.text("Gradient descent with learning rate $\\eta$ updates every "
                  "parameter $\\boldsymbol{\\theta}$, that is "
                  + self._list([p.name for p in self.d.params], n.matrix) + ", by")
        theta = r"\boldsymbol{\theta}"
        self.eqs(self.eq("sgd", theta, [rf"{theta} - \eta \frac{{\partial L}}{{\partial {theta}}}"],
                         rel=r"\leftarrow"))

    def algorithms(self):
        self.section("Algorithms")
        s, J, dl = r"\mathbf{s}", r"\mathbf{J}", r"\frac{\partial l_{t}}{\partial \mathbf{s}_{t}}"
        self.text("Naive BPTT propagates the error of each step $t'$ alone back through "
                  "all earlier steps, $O(T^2)$ steps in all:")
        self.eqs(
            self.eq("naive:delta", r"\boldsymbol{\delta}^{(t')}_{t}",
                    rf"{J}_{{t+1}}^{{\top}} \boldsymbol{{\delta}}^{{(t')}}_{{t+1}} "
                    rf"\quad (t < t'), \qquad \boldsymbol{{\delta}}^{{(t')}}_{{t'}} = "
                    rf"\frac{{\partial l_{{t'}}}}{{\partial {s}_{{t'}}}}"),
            self.eq("naive:sum", rf"\frac{{\partial L}}{{\partial {s}_{{t}}}}",
                    r"\sum_{t'=t}^{T} \boldsymbol{\delta}^{(t')}_{t}"))
        if self.d.bidirectional:
            self.text("(a reverse state's error goes through all later steps instead). The "
                      "propagation is linear, so the sum over $t'$ can be taken first: that "
                      "is the accumulated recurrence @eq{acc}, one sweep per direction, "
                      "$O(T)$, and the same gradient to rounding. Truncated BPTT, RTRL and "
                      "ARTBP learn online, forward in time; a reverse state's step $t$ needs "
                      "the inputs of every later step, so they do not apply to this model.")
            return
        self.text("The propagation is linear, so the sum over $t'$ can be taken first: "
                  "that is the accumulated recurrence @eq{acc}, one sweep, $O(T)$, and the "
                  "same gradient to rounding. Truncated BPTT($k_1$, $k_2$) runs, every $k_1$ "
                  "steps $\\tau = k_1, 2k_1, \\dots$, one sweep over the last $k_2 \\ge k_1$ "
                  "steps with the losses of the newest $k_1$, in $O(T k_2 / k_1)$; with "
                  "$k_1 = k_2 = T$ it is @eq{acc}. The recurrence becomes")
        self.eqs(self.eq("tbptt", r"\boldsymbol{\delta}^{(\tau)}_{t}",
                         [rf"[t > \tau - k_1] {dl}",
                          rf"+ [t < \tau] {J}_{{t+1}}^{{\top}} "
                          r"\boldsymbol{\delta}^{(\tau)}_{t+1}, \quad \tau - k_2 < t \le \tau"]))
        changed = ["@eq{error}"] + [f"@eq{{vector:adj:{x}}}" for x in self.states
                                   if f"vector:adj:{x}" in self.keys]
        self.text("and the gradients sum over the windows, $\\sum_{\\tau} "
                  "\\sum_{t=\\tau-k_2+1}^{\\tau}$ in place of $\\sum_{t=1}^{T}$. For this "
                  "model the equations that change are " + ", ".join(changed) + ":")
        eqs = [self.eq("error:trunc", self.names.adjoint(self.loss_node),
                       self.expr_pieces(self.loss_vec, self._error_expr(truncated=True)))]
        for name in self.states:
            if f"vector:adj:{name}" in self.keys:
                eqs.append(self.adjoint_eq(name, "vector", truncated=True))
        self.eqs(*eqs)

    def tangent_eq(self, name):
        """z_dot = sum over args of (dz/da) a_dot + (dz/dp) p_dot, the Backward's sum;
        arguments with the same coefficient (a pre-activation's summands) summed first."""
        by_coef = {}
        for t in self.d.backward.tangent(name):
            by_coef.setdefault(t.expr, []).append(sp.Symbol(f"dot:{t.via}"))
        terms = [coef * sp.Add(*dots, evaluate=False) if len(dots) > 1 else coef * dots[0]
                 for coef, dots in by_coef.items()]
        pieces = self.terms(self.vec, terms)
        if name in self.names.reductions:  # the sum over its units of the summand's tangent
            pieces[0] = r"\mathbf{1}^{\top} \bigl(" + pieces[0]
            pieces[-1] += r"\bigr)"
        return self.eq(naming.equation_key("dot", name), self.names.tangent(name), pieces)

    def rtrl(self):
        d, n = self.d, self.names
        theta, s = r"\boldsymbol{\theta}", r"\mathbf{s}"
        self.section("Real-time recurrent learning")
        self.text("RTRL (seed 001) runs forwards only. It carries the derivative of the "
                  "states along the parameters, the sensitivity $\\dot{\\mathbf{s}}_{t} = "
                  "d\\mathbf{s}_{t} / d\\boldsymbol{\\theta}$ (one column per parameter "
                  "element; $\\dot{\\mathbf{s}}_{0} = 0$, the initial states are given), and "
                  "adds the share of each step to the gradient as soon as its loss is known:")
        self.eqs(
            self.eq("rtrl", r"\dot{\mathbf{s}}_{t}",
                    [r"\mathbf{J}_{t} \dot{\mathbf{s}}_{t-1}",
                     rf"+ \frac{{\partial {s}_{{t}}}}{{\partial {theta}}}"]),
            self.eq("rtrl:grad", rf"\frac{{\partial L}}{{\partial {theta}}}",
                    [rf"\sum_{{b=1}}^{{B}} \sum_{{t=1}}^{{T}} \bigl(\frac{{\partial l_{{t}}}}"
                     rf"{{\partial {s}_{{t}}}} \dot{{\mathbf{{s}}}}_{{t}}",
                     rf"+ \frac{{\partial l_{{t}}}}{{\partial {theta}}}\bigr)"]))
        tangents = [x.name for x in d.nodes
                    if x.kind != "linear" and x.name in d.backward.tangent_vectors]
        self.text(
            "The right-hand side of @eq{rtrl} is the tangent of the forward step: the step "
            "differentiated forwards, node by node, with the local derivatives of the "
            "backward step as coefficients. A dot marks the derivative along the "
            "parameters; $\\dot{\\mathbf{W}}\\mathbf{v}$ is that of a product at fixed "
            "$\\mathbf{v}$ ($v_{k}$ in row $j$ of the column of $W_{jk}$) and "
            "$\\dot{\\mathbf{b}}$ holds the unit directions of a vector parameter. For this "
            "model, with $\\dot{\\mathbf{s}}_{t-1}$ of the previous step:")
        self.eqs(*(self.tangent_eq(x) for x in tangents))
        directions = d.backward.directions
        rest = [p.name for p in d.params if p.name not in directions]
        size = DerivationPrinter({"symbols": {x: naming.size(x) for x in d.sizes}})
        count = sum((sp.Mul(*(sp.Symbol(x) for x in d.param(p).shape)) for p in directions),
                    sp.S.Zero)
        self.text(
            "The parameters with directions are those that reach a state, "
            + self._list(directions, n.matrix) + f": $P = {size.doprint(count)}$ "
            "columns. " + ("The others, " + self._list(rest, n.matrix) + ", feed the "
                           "readout only; their gradients, "
                           + ", ".join(f"@eq{{vector:grad:{p}}}" for p in rest)
                           + ", need no recurrence and are computed as in BPTT. "
                           if rest else "")
            + "RTRL keeps $O(HP)$ numbers per sequence and spends $O(H^{2}P)$ per step on "
            "$\\mathbf{J}_{t} \\dot{\\mathbf{s}}_{t-1}$, $O(H^{4})$ when $P$ grows as "
            "$H^{2}$, against $O(H^{2})$ for a step of BPTT; in exchange it stores no "
            "trajectory and knows the gradient online. At fixed weights @eq{rtrl:grad} "
            "equals the gradient of the accumulated recurrence @eq{acc} to rounding.")

    def artbp(self):
        delta, J = r"\tilde{\boldsymbol{\delta}}", r"\mathbf{J}"
        self.section("Anticipated reweighted truncation (ARTBP)")
        self.text(
            "Truncation biases the gradient: @eq{tbptt} drops every path longer than its "
            "window. ARTBP (Tallec and Ollivier 2017, seed 003) cuts the recurrence at "
            "random instead, before step $t$ with probability $c_{t}$ ($\\varepsilon_{t} = "
            "1$, drawn independently of the trajectory), and scales what crosses an uncut "
            "step by $1/(1 - c_{t})$:")
        self.eqs(
            self.eq("artbp:kappa", r"\kappa_{t}",
                    r"\frac{1 - \varepsilon_{t}}{1 - c_{t}}, \qquad \varepsilon_{t} \sim "
                    r"\operatorname{Bernoulli}(c_{t}), \qquad \operatorname{E}\kappa_{t} = 1"),
            self.eq("artbp", rf"{delta}_{{t}}",
                    [r"\frac{\partial l_{t}}{\partial \mathbf{s}_{t}}",
                     rf"+ \kappa_{{t+1}} {J}_{{t+1}}^{{\top}} {delta}_{{t+1}}"]))
        changed = [f"@eq{{vector:adj:{x}}}" for x in self.states
                   if f"vector:adj:{x}" in self.keys]
        self.text(
            "Unrolled, $" + delta + "_{t}$ weighs the loss of step $t'$ by $\\prod_{u=t+1}"
            "^{t'} \\kappa_{u}$, whose mean is 1 because the draws are independent: $"
            "\\operatorname{E}" + delta + "_{t} = \\boldsymbol{\\delta}_{t}$ of @eq{acc}, "
            "and the gradients, linear in the adjoints, are unbiased. The cost is that of "
            "one sweep, $O(T)$; between two cuts the sweep is a stretch of @eq{acc}, so an "
            "online learner updates at each cut, every $1/c$ steps on average. "
            + (("For this model the equation that changes is " if len(changed) == 1 else
                "For this model the equations that change are ") + ", ".join(changed) + ":"
               if changed else "No state adjoint of this model carries a previous state."))
        self.eqs(*(self.adjoint_eq(x, "vector", reweighted=True) for x in self.states
                   if f"vector:adj:{x}" in self.keys))

    def per_element(self):
        d, n = self.d, self.names
        j, k = n.index, n.sum_index
        self.section("Per-element form")
        self.text(f"The same step, recurrence and gradients for element ${j}$ of each "
                  f"vector; ${k}$ runs over the columns of a matrix.")
        self.eqs(*(self._node_eq(x, self.idx, "index") for x in d.nodes
                   if x.kind != "linear"))
        self.text("Backward step, with $" + n.adjoint_element(self.loss_node) + "$ the "
                  "element of @eq{error}:")
        eqs = []
        for name in self.d.backward.sweep:
            if name == self.loss_node and not self.adjoint_terms(name):
                continue
            eqs.append(self.adjoint_eq(name, "index"))
        self.eqs(*eqs)
        self.text("Gradients:")
        self.eqs(*(self.gradient_eq(p, "index") for p in d.params))


# -- writers -------------------------------------------------------------------------

_MARKUP = re.compile(r"(\$[^$]+\$|@eq\{[^}]+\}|`[^`]+`)")
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def _escape(text):
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


_TOKEN = re.compile(r"\\[a-zA-Z]+|\\.|[{}^_]|\S")
_ZERO = {r"\mathbf", r"\boldsymbol", r"\mathit", r"\mathrm", r"\operatorname", r"\overline",
         r"\dot", r"\tilde", r"\bar", r"\left", r"\right", r"\bigl", r"\bigr", r"\nonumber",
         r"\limits"}
_WIDE = {r"\sum": 1.6, r"\odot": 1.8, r"\quad": 1.0, r"\qquad": 2.0, r"\,": 0.2,
         r"\tanh": 2.4, r"\log": 2.0, r"\max": 2.4, r"\partial": 0.9, r"\top": 0.8,
         r"\leftarrow": 1.8, r"\le": 1.8, r"\ge": 1.8, r"\dots": 1.5}
_CHAR = {"+": 1.8, "-": 1.8, "=": 1.8, "<": 1.8, ">": 1.8, ",": 0.4, "(": 0.5, ")": 0.5,
         "[": 0.4, "]": 0.4, "1": 0.7, "'": 0.3}


def _visible_width(tex):
    """Rough printed width of a LaTeX formula in letter widths, for line breaking:
    scripts at 60%, a fraction as wide as its wider part, decorations free."""
    tokens = _TOKEN.findall(tex)
    pos = 0

    def argument():
        nonlocal pos
        if pos >= len(tokens):
            return 0.0
        token = tokens[pos]
        pos += 1
        if token == "{":
            return sequence(closing=True)
        return atom(token)

    def atom(token):
        if token in (r"\frac", r"\tfrac"):
            return max(argument(), argument())
        if token in ("^", "_"):
            return 0.6 * argument()
        if token in (r"\left", r"\right", r"\bigl", r"\bigr"):
            argument()  # the delimiter
            return 0.5
        if token in _ZERO:
            return 0.0
        if token.startswith("\\"):
            return _WIDE.get(token, 1.0)
        return _CHAR.get(token, 1.0)

    def sequence(closing=False):
        nonlocal pos
        width = 0.0
        while pos < len(tokens):
            token = tokens[pos]
            pos += 1
            if token == "}" and closing:
                return width
            width += sequence(closing=True) if token == "{" else atom(token)
        return width

    return sequence()


def _lines(eq):
    """The pieces of an equation grouped into lines of at most LINE_WIDTH."""
    lines, current = [], []
    width = _visible_width(eq.lhs) + 2
    for piece in eq.pieces:
        w = _visible_width(piece)
        if current and width + w > LINE_WIDTH:
            lines.append(current)
            current, width = [], _visible_width(eq.lhs) + 3
        current.append(piece)
        width += w
    lines.append(current)
    return [" ".join(line) for line in lines]


def _numbered(blocks):
    """The equations of the blocks in order, each given its number (from 1)."""
    eqs = [e for block in blocks for e in block.eqs]
    for number, e in enumerate(eqs, 1):
        e.number = number
    return eqs


@lru_cache(maxsize=32)
def equation_numbers(derivation):
    """Key -> number of every equation of the derivation as ``render`` prints it (the
    per-element form adds equations after these only): what generated code cites."""
    return {e.key: e.number for e in _numbered(_Builder(derivation, False).build())}


class _Writer:
    def __init__(self, derivation, blocks):
        self.d, self.blocks = derivation, blocks
        self.slug = re.sub(r"[^A-Za-z0-9]+", "-", derivation.name)
        self.eqs = {}
        used = set()
        for e in _numbered(blocks):
            base = "eq:" + self.slug + ":" + re.sub(r"[^A-Za-z0-9:]+", "-", e.key)
            label, i = base, 1
            while label in used:
                i += 1
                label = f"{base}-{i}"
            used.add(label)
            e.label = label
            self.eqs[e.key] = e

    def markup(self, text, ref, code, escape, math=lambda tex: tex):
        """The text's markup in this writer's form: $math$ (by ``math``, given the
        $-delimited piece), @eq{key} references, `code` and plain text."""
        out = []
        for part in _MARKUP.split(text):
            if part.startswith("$") and part.endswith("$") and len(part) > 1:
                out.append(math(part))
            elif part.startswith("@eq{"):
                out.append(ref(self.eqs[part[4:-1]]))
            elif part.startswith("`") and part.endswith("`") and len(part) > 1:
                out.append(code(part[1:-1]))
            else:
                out.append(escape(part))
        return "".join(out)


class _LatexWriter(_Writer):
    def text(self, markup):
        return self.markup(markup, lambda e: rf"\eqref{{{e.label}}}",
                           lambda c: rf"\texttt{{{_escape(c)}}}", _escape)

    def align(self, eqs):
        rows = []
        for e in eqs:
            lines = _lines(e)
            first = f"{e.lhs} &{e.rel} {lines[0]}"
            rest = [rf"&\quad {line}" for line in lines[1:]]
            all_lines = [first] + rest
            body = " \\nonumber\\\\\n  ".join(all_lines)
            rows.append(f"  {body} \\label{{{e.label}}}")
        return "\\begin{align}\n" + "\\\\\n".join(rows) + "\n\\end{align}"

    def table(self, rows):
        out = [r"\begin{longtable}{@{}lllp{0.42\linewidth}@{}}",
               r"\hline symbol & shape & code & meaning \\ \hline \endhead"]
        for symbol, code, meaning, shape in rows:
            out.append(f"${symbol}$ & {self.text(shape)} & \\texttt{{{_escape(code)}}} & "
                       f"{self.text(meaning)} \\\\")
        out.append(r"\hline")
        out.append(r"\end{longtable}")
        return "\n".join(out)

    def body(self, fragment=False):
        out = []
        for block in self.blocks:
            if block.kind == "section":
                out.append(f"% --- {block.text}" if fragment else
                           f"\\section{{{_escape(block.text)}}}")
            elif block.kind == "eqs":
                out.append(self.align(block.eqs))
            elif fragment:
                continue
            elif block.kind == "text":
                # A sentence that goes on after an equation ("where ...") is not a
                # new paragraph.
                indent = r"\noindent " if block.text[:1].islower() else ""
                out.append(indent + self.text(block.text))
            elif block.kind == "table":
                out.append(self.table(block.rows))
        return "\n\n".join(out) + "\n"

    def document(self):
        name = _escape(self.d.name)
        head = "\n".join([
            f"% Generated by bpttgen from the derivation of model '{self.d.name}'. "
            "Do not edit.",
            r"\documentclass[11pt]{article}",
            r"\usepackage[margin=2cm]{geometry}",
            r"\usepackage{amsmath}",
            r"\usepackage{longtable}",
            r"\allowdisplaybreaks",
            rf"\title{{Backpropagation through time: \texttt{{{name}}}}}",
            r"\author{derived by bpttgen}",
            r"\date{}",
            r"\begin{document}",
            r"\maketitle",
            "",
            self.text(
                f"This derivation is printed from the Derivation of the model `{self.d.name}`, "
                "the object its generated code is rendered from: the local derivatives "
                "are SymPy's, and every symbol has the code name of the table below."),
            "",
        ])
        return head + "\n" + self.body() + "\n\\end{document}\n"

    def fragment(self):
        head = (f"% Equations of the BPTT derivation of model '{self.d.name}', generated "
                "by bpttgen.\n% Needs \\usepackage{amsmath}. Labels: eq:"
                f"{self.slug}:...\n\n")
        return head + self.body(fragment=True)


class _MarkdownWriter(_Writer):
    def text(self, markup):
        return self.markup(markup, lambda e: f"({e.number})", lambda c: f"`{c}`",
                           lambda t: t)

    def document(self):
        out = [f"# Backpropagation through time: `{self.d.name}`",
               self.text(f"This derivation is printed from the Derivation of the model "
                         f"`{self.d.name}`, the object its generated code is rendered "
                         "from: the local derivatives are SymPy's, and every symbol has "
                         "the code name of the table below.")]
        section = 0
        for block in self.blocks:
            if block.kind == "section":
                section += 1
                out.append(f"## {section} {block.text}")
            elif block.kind == "text":
                out.append(self.text(block.text))
            elif block.kind == "table":
                rows = ["| symbol | shape | code | meaning |", "| --- | --- | --- | --- |"]
                rows += [f"| ${s}$ | {self.text(shape)} | `{c}` | {self.text(m)} |"
                         for s, c, m, shape in block.rows]
                out.append("\n".join(rows))
            elif block.kind == "eqs":
                out += [f"$$\n{e.body()} \\tag{{{e.number}}}\n$$" for e in block.eqs]
        return "\n\n".join(out) + "\n"


class _TextWriter(_Writer):
    """Plain Unicode text for a terminal (plaintext.py reads this module's LaTeX)."""

    def text(self, markup):
        return self.markup(markup, lambda e: f"({e.number})", lambda c: c, lambda t: t,
                           math=lambda tex: plaintext.to_text(tex[1:-1]))

    def document(self):
        out = [f"Backpropagation through time: {self.d.name}"]
        section = 0
        for block in self.blocks:
            if block.kind == "section":
                section += 1
                title = f"{section} {block.text}"
                out.append(f"{title}\n{'-' * len(title)}")
            elif block.kind == "text":
                out.append(textwrap.fill(self.text(block.text), 88))
            elif block.kind == "table":
                rows = [(plaintext.to_text(s), self.text(shape), c, self.text(m))
                        for s, c, m, shape in block.rows]
                widths = [max(plaintext.width(r[i]) for r in rows) for i in range(3)]
                out.append("\n".join(
                    "  ".join(cell + " " * (w - plaintext.width(cell))
                              for cell, w in zip(r[:3], widths)) + "  " + r[3]
                    for r in rows))
            elif block.kind == "eqs":
                out.append("\n".join(self.equation(e) for e in block.eqs))
        return "\n\n".join(out) + "\n"

    def equation(self, e):
        tag = f"({e.number})"
        rel = plaintext.to_text(e.rel)
        body = f"{plaintext.to_text(e.lhs)} {rel} " + " ".join(
            plaintext.to_text(p) for p in e.pieces)
        return f"{tag:>6} {body}"


def section_equations(derivation):
    """{section title: [its equations as numbered lines of text]}: the derivation in
    pieces, for a terminal (the demo prints the forward and backward steps)."""
    blocks = _Builder(derivation, False).build()
    writer = _TextWriter(derivation, blocks)
    out, title = {}, None
    for block in blocks:
        if block.kind == "section":
            title = block.text
        elif block.kind == "eqs":
            out.setdefault(title, []).extend(writer.equation(e) for e in block.eqs)
    return out


def render(derivation, form="document", index_form=False):
    """The derivation as LaTeX or Markdown.

    ``form``: "document" (a complete article, amsmath), "fragment" (the numbered and
    labelled equations only, to paste into a paper), "markdown" ($$ blocks with
    \\tag numbers, as GitHub and Jupyter render them) or "text" (plain Unicode for a
    terminal). ``index_form`` adds every equation per
    element, in the style of seed 004.
    """
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; one of {', '.join(FORMS)}")
    blocks = _Builder(derivation, index_form).build()
    if form == "markdown":
        return _MarkdownWriter(derivation, blocks).document()
    if form == "text":
        return _TextWriter(derivation, blocks).document()
    writer = _LatexWriter(derivation, blocks)
    return writer.document() if form == "document" else writer.fragment()
