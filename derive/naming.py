"""The one vocabulary of a Derivation: each identifier's code name and LaTeX symbol.

A Derivation names every vector and parameter by the identifier the model definition
gave it ("h", "h_prev", "W_xh", "b_h") or derived from it (the product W_xh @ x is the
node "W_xh_x"). Generated code uses these identifiers as variable names, and the
adjoints and gradients below add a fixed prefix, so an equation of the LaTeX
derivation and the line of a kernel that implements it read side by side:

    identifier       code name        LaTeX (vector form)
    x                x                \\mathbf{x}_{t}
    h (a state)      h                \\mathbf{h}_{t}
    h_prev           h_prev           \\mathbf{h}_{t-1}
    W_xh             W_xh             \\mathbf{W}_{xh}
    b_h              b_h              \\mathbf{b}_{h}
    W_xh_x           W_xh_x           \\mathbf{W}_{xh}\\mathbf{x}_{t}    (a product node)
    adjoint of h     delta_h          \\boldsymbol{\\delta}^{h}_{t}      (accumulated, seed 000)
    tangent of h     h_dot            \\dot{\\mathbf{h}}_{t}              (RTRL: dh_t/dtheta)
    adjoint of z     d_z              \\bar{\\mathbf{z}}_{t}
    gradient of W    d_W_xh           \\frac{\\partial L}{\\partial \\mathbf{W}_{xh}}

The adjoint of h_prev at step t, written \\bar{\\mathbf{h}}_{t-1}, is the part of
delta_h at step t-1 that flows through step t; kernels add it into delta_h in place,
so its code name is delta_h too.

An identifier is split once, the same way everywhere: the text before the first
underscore is the base symbol, the rest a subscript, and trailing digits that
follow a letter are a layer number written as a superscript (h1 -> h^{(1)},
W_xh2 -> W^{(2)}_{xh}, but W_1 -> W_1). Greek names (alpha, lambda) become Greek
letters. This module is read by derive/model.py, derive/latex.py and codegen/.

A user's name reaches generated code as a variable name, so the definition API asks
``identifier_problem`` about every name before it accepts it (Tangent's naming
module keeps a set of taken names for the same reason). A name is refused, with the
clash named, when it is a Python keyword, an identifier the generated code binds or
calls itself (``T``, ``carry``, ``np``, ``range``, ...), or has the shape of a name
the generator derives from another one (``d_h``, ``h_seq``, ``P_x``, a leading
underscore, a double underscore): every derived name has a prefix or suffix below,
so a name without them can never meet one. tests/test_naming.py parses every
generated module and fails if the code binds a name this module does not know.
"""

import keyword
import re
import sys
import unicodedata
from dataclasses import dataclass

from sympy.printing.latex import translate

_LAYER = re.compile(r"^(.*[A-Za-z])(\d+)$")
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota",
          "kappa", "lambda", "mu", "nu", "xi", "pi", "rho", "sigma", "tau", "upsilon",
          "phi", "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Pi",
          "Sigma", "Upsilon", "Phi", "Psi", "Omega"}


# -- the names generated code takes for itself ----------------------------------------

#: What the generator prefixes to a user's name (adjoints d_, delta_, gradients dW_,
#: product groups P_ and their stacked weights W_P_ and scratch rows, temporaries _)
#: and appends to it (value arrays _seq, RTRL tangents _dot, CUDA per-row bias
#: gradients _rows). A second group of one source is P_<source>__<phase>.
DERIVED_PREFIXES = ("_", "d_", "delta_", "dW_", "P_", "W_P_", "WT_P_", "scratch_")
DERIVED_SUFFIXES = ("_seq", "_dot", "_rows")

#: Functions and modules the generated kernels call (the printer's targets included).
CALLED = frozenset({
    "np", "math", "numba", "njit", "cuda", "crt", "online", "runtime",
    "exp", "tanh", "sigmoid", "softplus", "relu", "step",
    "abs", "min", "max", "range", "float", "int", "len",
})
#: Arguments and locals of the step kernels, where every name of the model but the
#: loss's sums is a variable too.
KERNEL_LOCALS = frozenset({
    "T", "B", "TB", "NP", "t_hi", "t_lo", "carry", "grad", "l2", "loss", "scale", "stages",
    "targets", "total", "w", "weights",
    "y",  # the kernels' prediction array is y_seq, which a vector y would also take
})
#: Locals of the loss kernel, where the output size and the loss's sums are variables
#: (z, d, m, K and y are the loss's own symbols).
LOSS_LOCALS = frozenset({"TB", "d", "m", "K", "y", "z", "scale", "targets", "total",
                         "weights"})
#: Names of the generated module's Python functions and globals, where the size names
#: (and, in the CUDA module's host functions, the vector parameters) are variables too.
DRIVER_NAMES = frozenset({
    "ALGORITHMS", "B", "KERNELS", "KERNEL_FUNCTIONS", "NAME", "NP", "PARAMS", "RTRL_PARAMS",
    "SIZES", "SPEC", "STATES", "T", "TB", "Trainer", "TypeError", "ValueError", "a", "algorithm",
    "args", "c", "call", "count", "dict", "directions", "dtype", "final", "first",
    "flat_targets", "forward", "free_workspace", "grad", "grads", "init_params", "k1",
    "k2", "l2", "loss", "loss_and_grads", "loss_rows", "mask", "memory", "memory_limit",
    "module_name", "name", "out", "params", "plan", "role", "rtrl", "rtrl_directions",
    "g", "s", "scale", "seed", "sens", "sensitivities", "shape", "sizes", "state0",
    "t_hi", "t_lo", "targets", "total", "truncate", "w", "weights", "ws", "x", "y",
})
#: Modules a generated module imports or is imported beside: a model must not be
#: named like one of them (its generated file would shadow it).
MODULES = frozenset({"numpy", "numba", "scipy", "sympy", "jinja2", "llvmlite", "derive",
                     "codegen", "generated", "templates", "bpttgen", "tests"}
                    | set(getattr(sys, "stdlib_module_names", ())))

def identifier_problem(name, kind):
    """None if ``name`` may name a ``kind`` of the model ("size", "model", "loss sum",
    or any vector or parameter kind), else why not, in words.

    >>> identifier_problem("W_xh", "matrix") is None
    True
    >>> identifier_problem("lambda", "param")
    "'lambda' is a Python keyword (e.g. 'lambda_' would do)"
    >>> identifier_problem("d_h", "node")
    "'d_h' starts with 'd_', which the generated code adds to a name for a name of its own"
    """
    if not isinstance(name, str) or not name.isidentifier():
        return f"{name!r} is not a Python identifier"
    if unicodedata.normalize("NFKC", name) != name:
        # Python reads the identifier as its NFKC form (ℌ as H), a string as written.
        return (f"{name!r} is not in Unicode's NFKC form; Python would read it as "
                f"{unicodedata.normalize('NFKC', name)!r}")
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        return f"'{name}' is a Python keyword (e.g. '{name}_' would do)"
    if kind == "model":
        if name in MODULES:
            return (f"'{name}' is the name of a module; the generated file {name}.py "
                    "would shadow it")
        return None
    if "__" in name:
        return f"'{name}' has a double underscore, which the generated code keeps for itself"
    for prefix in DERIVED_PREFIXES:
        if name.startswith(prefix):
            return (f"'{name}' starts with '{prefix}', which the generated code adds to a "
                    "name for a name of its own")
    for suffix in DERIVED_SUFFIXES:
        if name.endswith(suffix):
            return (f"'{name}' ends with '{suffix}', which the generated code adds to a "
                    "name for a name of its own")
    taken = CALLED | (LOSS_LOCALS if kind == "loss sum" else KERNEL_LOCALS)
    if kind == "size":  # an argument of every kernel and a local of the driver
        taken = taken | LOSS_LOCALS | DRIVER_NAMES
    elif kind == "param":  # a vector parameter is a local of CUDA host functions
        taken = taken | DRIVER_NAMES
    if name in taken:
        return f"'{name}' is a variable or function of the generated code"
    return None


# -- code names ----------------------------------------------------------------------

def code_adjoint(name, states):
    """Code name of the adjoint of vector ``name``; ``states`` are the state names.

    >>> code_adjoint("h", {"h"}), code_adjoint("h_prev", {"h"}), code_adjoint("z", {"h"})
    ('delta_h', 'delta_h', 'd_z')
    """
    for s in states:
        if name in (s, f"{s}_prev"):
            return f"delta_{s}"
    return f"d_{name}"


def code_tangent(name):
    """Code name of the derivative of a vector along the parameters (RTRL's
    sensitivity for a state), one column per parameter direction.

    >>> code_tangent("h"), code_tangent("h_prev")
    ('h_dot', 'h_prev_dot')
    """
    return f"{name}_dot"


def code_gradient(param):
    """Code name of dL/dparam of a vector parameter (a matrix's gradient is its rows of
    its product group's stacked gradient, ``code_group_gradient``).

    >>> code_gradient("b_h")
    'd_b_h'
    """
    return f"d_{param}"


def code_array(name):
    """The array holding a vector (or an adjoint) at every row t*B + b of a call.

    >>> code_array("h"), code_array(code_adjoint("h", {"h"})), code_array("x")
    ('h_seq', 'delta_h_seq', 'x_seq')
    """
    return f"{name}_seq"


def code_scratch(group):
    """The rows a product group's backward product is written to before it is added
    into its source's adjoint.

    >>> code_scratch("P_h_prev")
    'scratch_P_h_prev'
    """
    return f"scratch_{group}"


def code_coefficient(node, arg):
    """A kernel temporary: d node / d arg at one element (RTRL's tangent step).

    >>> code_coefficient("h", "a")
    '_dh__da'
    """
    return f"_d{node}__d{arg}"


def code_direction(param):
    """The first RTRL direction (column) of a parameter's elements.

    >>> code_direction("W_hh")
    '_o_W_hh'
    """
    return f"_o_{param}"


def code_group(source, phase=None):
    """Code name of a product group: the products of one phase that read ``source``,
    computed as one matrix product with their weights stacked. A second group of the
    same source (another phase) takes the phase after a double underscore, which no
    user name has.

    >>> code_group("x"), code_group("h", "post")
    ('P_x', 'P_h__post')
    """
    return f"P_{source}" if phase is None else f"P_{source}__{phase}"


def code_lookup_group(weight, tokens):
    """Code name of an embedding lookup's group: one table gathered by the tokens, a
    group of its own (never stacked with another table), so that a product reading
    the looked-up vector reads a whole array.

    >>> code_lookup_group("E", "x")
    'P_E__x'
    """
    return f"P_{weight}__{tokens}"


def code_group_transposed(group):
    """A recurrent product group's stacked weights transposed, contiguous (or empty).

    >>> code_group_transposed("P_h_prev")
    'WT_P_h_prev'
    """
    return f"WT_{group}"


def code_group_weights(group):
    """The stacked weights of a product group.

    >>> code_group_weights("P_x")
    'W_P_x'
    """
    return f"W_{group}"


def code_group_gradient(group):
    """The stacked gradient of a product group's weights (each weight's rows).

    >>> code_group_gradient("P_x")
    'dW_P_x'
    """
    return f"dW_{group}"


# -- equations -----------------------------------------------------------------------

def equation_key(kind, name, form="vector"):
    """The key of an equation of the LaTeX derivation, by what it defines: ``fwd`` a
    node's value, ``adj`` a vector's adjoint, ``grad`` a parameter's gradient, ``dot``
    a vector's RTRL tangent. Kernels cite the equation a line implements by its number
    (latex.equation_numbers), found under this key.

    >>> equation_key("adj", "h"), equation_key("dot", "c", "index")
    ('vector:adj:h', 'rtrl:dot:c')
    """
    if kind == "dot":
        return f"rtrl:dot:{name}"
    return f"{form}:{kind}:{name}"


# -- LaTeX symbols -------------------------------------------------------------------

@dataclass(frozen=True)
class Parts:
    """An identifier split into base symbol, subscript and layer (all LaTeX)."""

    base: str
    sub: str = ""
    layer: str = ""
    word: bool = False  # a multi-letter base, set as one word


def split(identifier):
    """Split an identifier into base, subscript and layer.

    >>> split("W_xh")
    Parts(base='W', sub='xh', layer='', word=False)
    >>> split("W_xh1")
    Parts(base='W', sub='xh', layer='1', word=False)
    >>> split("h1"), split("W_1").sub
    (Parts(base='h', sub='', layer='1', word=False), '1')
    >>> split("zg").word, split("alpha").base
    (True, '\\\\alpha')

    A trailing underscore, Python's escape for a keyword, is not printed:

    >>> split("lambda_").base
    '\\\\lambda'
    """
    if identifier.endswith("_") and identifier.strip("_"):
        identifier = identifier.rstrip("_")
    base, _, sub = identifier.partition("_")
    pieces = sub.split("_") if sub else []
    if not base or any(not p for p in pieces):
        # Leading or doubled underscores: keep the identifier whole, as a word.
        return Parts(r"\_".join(identifier.split("_")), word=True)
    layer = ""
    if pieces:
        found = _LAYER.match(pieces[-1])
        if found:
            pieces[-1], layer = found.groups()
    else:
        found = _LAYER.match(base)
        if found:
            base, layer = found.groups()
    word = len(base) > 1 and base not in _GREEK
    sub = ",".join(translate(p) if p in _GREEK else p for p in pieces)
    return Parts(translate(base) if base in _GREEK else base, sub, layer, word)


def _time(offset):
    return "t" if offset == 0 else f"t{offset:+d}"


def _join(*subscripts):
    return ",".join(s for s in subscripts if s)


def _bold(parts):
    if parts.base.startswith("\\") and not parts.word:
        return rf"\boldsymbol{{{parts.base}}}"
    return rf"\mathbf{{{parts.base}}}"


def _plain(parts):
    return rf"\mathit{{{parts.base}}}" if parts.word else parts.base


def _decorate(symbol, parts, *subscripts):
    sup = f"^{{({parts.layer})}}" if parts.layer else ""
    sub = _join(parts.sub, *subscripts)
    return symbol + sup + (f"_{{{sub}}}" if sub else "")


def bold(identifier, *subscripts):
    """The bold symbol of a vector or matrix identifier, with more subscripts.

    >>> bold("h1", "t-1"), bold("W_xh")
    ('\\\\mathbf{h}^{(1)}_{t-1}', '\\\\mathbf{W}_{xh}')
    """
    parts = split(identifier)
    return _decorate(_bold(parts), parts, *subscripts)


def plain(identifier, *subscripts):
    """The italic symbol of a scalar identifier, with more subscripts.

    >>> plain("S", "t"), plain("b_h1", "j")
    ('S_{t}', 'b^{(1)}_{h,j}')
    """
    parts = split(identifier)
    return _decorate(_plain(parts), parts, *subscripts)


class LatexNames:
    """LaTeX symbols for the identifiers of one Derivation.

    Vector form: bold vectors and matrices with a time subscript (``vector``,
    ``adjoint``, ``matrix``). Index form: one element, index ``j`` (and a summation
    index ``k``) chosen not to clash with the model's own symbols (``element``,
    ``adjoint_element``, ``matrix_element``). ``offset`` shifts time: 0 is step t,
    +1 is step t+1; a previous state is one step earlier than its step (one step
    later for a reverse state, which runs from the last step down).
    """

    def __init__(self, derivation):
        self.d = derivation
        self.states = {s.name for s in derivation.states}
        self.prevs = {s.prev: s.name for s in derivation.states}
        self.reverse = {s.name for s in derivation.states if s.reverse}
        self.linear = {n.name: n for n in derivation.nodes if n.kind == "linear"}
        # a reduction is one number per sequence and step: a plain symbol in both forms
        self.reductions = {n.name for n in derivation.nodes if n.kind == "reduction"}
        bases = {split(n).base for n in self._identifiers()}
        free = [c for c in "jkilmnpq" if c not in bases]
        self.index, self.sum_index = free[0], free[1]
        # an integer target's class per step: c_t, unless the model has a c (the LSTM's
        # cell state), which the text form would print the same
        self.target_class = next((c for c in "crsuva" if c not in bases), r"\kappa")

    def _identifiers(self):
        d = self.d
        return [*d.input_names, *self.prevs, *(n.name for n in d.nodes), *(p.name for p in d.params)]

    def _resolve(self, name, offset):
        """(identifier of the stored vector, time offset): h_prev is h one step back,
        a reverse state's one step ahead."""
        if name in self.prevs:
            state = self.prevs[name]
            return state, offset + (1 if state in self.reverse else -1)
        return name, offset

    def is_param(self, name):
        return any(p.name == name for p in self.d.params)

    # -- vector form -------------------------------------------------------------
    def vector(self, name, offset=0):
        """A vector of the step: x_t, h_{t-1}, a node, a bias (no time), or a product
        node written as the matrix-vector product it is (a lookup as the column of its
        table, E_{:,x_t}); a token input is an integer, x_t."""
        if name in self.linear:
            node = self.linear[name]
            if node.lookup:
                return self.lookup(node, ":", offset)
            return self.matrix(node.weight) + self.vector(node.source, offset)
        if self.d.tokens and name in self.d.input_names:
            return plain(name, _time(offset))
        if self.is_param(name):
            return bold(name)
        if name in self.reductions:
            return plain(name, _time(offset))
        name, offset = self._resolve(name, offset)
        return bold(name, _time(offset))

    def initial(self, name):
        """The initial value of a state: s_0, or s_T for a reverse state."""
        return bold(name, "T" if name in self.reverse else "0")

    def step(self, name):
        """The time offset of the step a state's previous value is taken at: -1, or
        +1 for a reverse state."""
        return 1 if self.prevs.get(name, name) in self.reverse else -1

    def matrix(self, name):
        return bold(name)

    def lookup(self, node, row, offset=0, table=None):
        """Element (row, x_t) of a lookup's table: row ":" is its column, the vector
        E_{:,x_t}; ``table`` another symbol of the table (its tangent). Braced when
        the table's symbol has subscripts of its own."""
        parts = split(node.weight)
        token = self.vector(node.source, offset)
        if table is None and not (parts.sub or parts.layer):
            return (bold if row == ":" else plain)(node.weight, row, token)
        table = table or (bold(node.weight) if row == ":" else plain(node.weight))
        return f"{{{table}}}_{{{row},{token}}}"

    def adjoint(self, name, offset=0):
        """dL/d(vector): delta^s_t for a state, a bar otherwise (h_prev: the part of
        the adjoint of h_{t-1} that flows through step t)."""
        if name in self.linear:
            return rf"\overline{{{self.vector(name, offset)}}}"
        if name in self.states:
            return rf"\boldsymbol{{\delta}}^{{{self.element_symbol(name)}}}_{{{_time(offset)}}}"
        if name in self.reductions:
            return self.adjoint_element(name, offset=offset)
        stored, shifted = self._resolve(name, offset)
        parts = split(stored)
        bold = _bold(parts)
        bar = rf"\bar{{{bold}}}" if not parts.word else rf"\overline{{{bold}}}"
        return _decorate(bar, parts, _time(shifted))

    def tangent(self, name, offset=0):
        """d(vector)/d theta, RTRL's sensitivity: a dot over a stored vector or a
        parameter (the unit directions of its elements)."""
        if name in self.linear and self.linear[name].lookup:  # the column of E's tangent
            node = self.linear[name]
            return self.lookup(node, ":", offset, table=self.tangent(node.weight))
        if not self.is_param(name):
            name, offset = self._resolve(name, offset)
        parts = split(name)
        times = () if self.is_param(name) else (_time(offset),)
        symbol = _plain(parts) if name in self.reductions else _bold(parts)
        return _decorate(rf"\dot{{{symbol}}}", parts, *times)

    def gradient(self, name):
        symbol = self.matrix(name)
        return rf"\frac{{\partial L}}{{\partial {symbol}}}"

    def element_symbol(self, name):
        """The plain (not bold) symbol with its layer, for superscripts: h^{(1)}."""
        return plain(name)

    # -- index form --------------------------------------------------------------
    def element(self, name, index=None, offset=0):
        """Element ``index`` of a vector; a product node is its sum over k."""
        index = index or self.index
        if name in self.linear:
            node = self.linear[name]
            if node.lookup:
                return self.lookup(node, index, offset)
            k = self.sum_index
            return (rf"\sum_{{{k}}} {self.matrix_element(node.weight, index, k)} "
                    + self.element(node.source, k, offset))
        if self.is_param(name):
            return plain(name, index)
        if name in self.reductions:  # the same for every unit
            return plain(name, _time(offset))
        name, offset = self._resolve(name, offset)
        return plain(name, _time(offset), index)

    def matrix_element(self, name, row, col):
        return plain(name, f"{row}{col}")

    def adjoint_element(self, name, index=None, offset=0):
        index = index or self.index
        if name in self.linear:
            return rf"{self.adjoint(name, offset)}_{{{index}}}"
        if name in self.states:
            return (rf"\delta^{{{self.element_symbol(name)}}}"
                    rf"_{{{_time(offset)},{index}}}")
        stored, shifted = self._resolve(name, offset)
        parts = split(stored)
        symbol = _plain(parts)
        bar = rf"\overline{{{symbol}}}" if parts.word else rf"\bar{{{symbol}}}"
        if name in self.reductions:
            return _decorate(bar, parts, _time(shifted))
        return _decorate(bar, parts, _time(shifted), index)

    def gradient_element(self, name, row, col=None):
        symbol = self.matrix_element(name, row, col) if col else plain(name, row)
        return rf"\frac{{\partial L}}{{\partial {symbol}}}"


def size(name):
    """A size name as a math symbol: H, or \\mathit{Hid} for a longer one.

    >>> size("H"), size("Hid")
    ('H', '\\\\mathit{Hid}')
    """
    parts = split(name)
    if parts.word or parts.sub or parts.layer:
        return rf"\mathit{{{name}}}".replace("_", r"\_")
    return parts.base
