"""The model definition API: the first stage of the data flow.

A definition declares sizes, inputs, recurrent states and parameters, then writes
one time step with ``@`` (matrix-vector products) and elementwise arithmetic on
vectors (any SymPy-differentiable function). Each vector is a SymPy expression
over *element symbols*: the symbol ``h`` stands for one element h_k, so ``tanh(a +
b)`` is the elementwise map. Matrix-vector products cannot be written per element,
so each becomes a named linear node. Mistakes are reported when the line that
makes them runs, with that line's file and number.

    m = Model("elman", sizes=("I", "H", "O"))
    x = m.input("x", "I")
    h = m.state("h", "H")
    W_xh, W_hh, b_h = m.matrix("W_xh", "H", "I"), m.matrix("W_hh", "H", "H"), m.bias("b_h", "H")
    m.update(h, tanh(W_xh @ x + W_hh @ h.prev + b_h))
    m.output(m.matrix("W_hy", "O", "H") @ h + m.bias("b_y", "O"), loss=softmax_cross_entropy)

A state declared with ``reverse=True`` is the backward direction of a bidirectional
layer: it runs from the last step down to the first, its ``prev`` is its value at t+1.
The readout may read states of both directions; the recurrence of one may not read
the other's (derivation.py refuses it at the line).

Several inputs: each ``m.input`` declares one more vector of the step; a call's x holds
them side by side in the order declared.

Token inputs: ``m.tokens("x", vocab="V")`` declares an integer input (x_t in [0, V)),
``E = m.embedding("E", "D", "V")`` a (D, V) table and ``E[x]`` its column x_t, a vector
of size D. Mathematically that is the product E @ onehot(x_t), so it is a linear node
(``lookup`` set) and derives like any product: the generated code gathers the column
in the forward and adds the adjoint into the columns used in the backward. The table
is (D, V), not (V, D), so it stacks and initialises like the weight W_x of the one-hot
model it replaces (uniform in +-1/sqrt(V)).

A reduction over the units of a vector (``m.sum``, ``m.mean``, ``m.layernorm``) is a
node of its own holding one number per sequence and step, a ``Scalar``: arithmetic
with a vector broadcasts it over the vector's units. Its Jacobian is not diagonal;
derivation.py differentiates the per-element summand with ``sympy.diff`` like any
other expression and backward.py sums the contributions over the units.
"""

from dataclasses import dataclass

import sympy as sp

from . import functions, losses, naming
from .errors import DefinitionError, _caller_location


@dataclass(frozen=True)
class ParamDef:
    name: str
    shape: tuple  # size names: (rows, cols) for a matrix, (n,) for a vector
    kind: str  # "matrix" | "vector"
    role: str  # "weight" | "bias" | "diagonal" | "gain": for initialisation and L2
    location: str


#: The size of a reduction's value: one number per sequence and step. Not a name a
#: user can give a size (a size is an identifier), so it never clashes with one.
SCALAR = "1"


@dataclass(frozen=True)
class NodeDef:
    name: str
    size: str  # SCALAR for a reduction
    kind: str  # "linear" | "elementwise" | "reduction"
    expr: sp.Expr = None  # elementwise: over element symbols; reduction: the summand
    weight: str = None  # linear: z = weight @ source
    source: str = None
    location: str = None
    over: str = None  # reduction: the size of the units summed over
    lookup: bool = False  # linear: weight @ onehot(source), source the token input


class Vec:
    """A vector-valued expression of one time step, held as a per-element SymPy
    expression. Arithmetic with another Vec is elementwise and needs equal sizes."""

    __array_priority__ = 100

    def __init__(self, model, expr, size):
        self.model, self.expr, self.size = model, sp.sympify(expr), size

    def _combine(self, other, op, symbol):
        if isinstance(other, State):
            other = other.t
        if isinstance(other, Scalar):
            if other.model is not self.model:
                raise DefinitionError("vectors from two different models combined")
            # A reduction's value is the same for every unit: broadcast.
            return Vec(self.model, op(self.expr, other.expr), self.size)
        if isinstance(other, Vec):
            if other.model is not self.model:
                raise DefinitionError("vectors from two different models combined")
            if other.size != self.size:
                raise DefinitionError(
                    f"shape mismatch in '{self.expr} {symbol} {other.expr}': sizes "
                    f"{self.size} and {other.size} differ")
            return Vec(self.model, op(self.expr, other.expr), self.size)
        if isinstance(other, (int, float, sp.Expr)):
            other = sp.sympify(other)
            loose = sorted(s.name for s in other.free_symbols)
            if loose:
                raise DefinitionError(
                    f"'{self.expr} {symbol} {other}' uses the SymPy symbol(s) {loose}, "
                    "which are not vectors of the model: bind them with m.expr(..., "
                    f"{loose[0]}=vector)")
            return Vec(self.model, op(self.expr, other), self.size)
        return NotImplemented

    def __add__(self, o): return self._combine(o, lambda a, b: a + b, "+")
    def __radd__(self, o): return self._combine(o, lambda a, b: b + a, "+")
    def __sub__(self, o): return self._combine(o, lambda a, b: a - b, "-")
    def __rsub__(self, o): return self._combine(o, lambda a, b: b - a, "-")
    def __mul__(self, o): return self._combine(o, lambda a, b: a * b, "*")
    def __rmul__(self, o): return self._combine(o, lambda a, b: b * a, "*")
    def __truediv__(self, o): return self._combine(o, lambda a, b: a / b, "/")
    def __rtruediv__(self, o): return self._combine(o, lambda a, b: b / a, "/")
    def __pow__(self, o): return self._combine(o, lambda a, b: a ** b, "**")
    def __rpow__(self, o): return self._combine(o, lambda a, b: b ** a, "**")
    def __neg__(self): return Vec(self.model, -self.expr, self.size)
    def __abs__(self): return Vec(self.model, sp.Abs(self.expr), self.size)

    def apply(self, function):
        """Apply a scalar SymPy function (or a lambda building a SymPy expression)
        to every element: ``v.apply(sympy.erf)``."""
        expr = function(self.expr)
        _check_function(function, expr)
        return Vec(self.model, expr, self.size)

    def __repr__(self):
        return f"Vec({self.expr}, size={self.size})"


class State:
    """A recurrent state s: ``s.prev`` is s_{t-1} (s_{t+1} for a reverse state, which
    runs from the last step down to the first); after ``m.update(s, ...)`` the state
    itself (or ``s.t``) is s_t."""

    def __init__(self, model, name, size, location, reverse=False):
        self.model, self.name, self.size, self.location = model, name, size, location
        self.reverse = reverse
        self.prev = Vec(model, model._symbol(f"{name}_prev"), size)
        self.updated = False

    @property
    def t(self):
        if not self.updated:
            raise DefinitionError(
                f"state '{self.name}' used before m.update({self.name}, ...): write "
                f"{self.name}.prev for its value at {'t+1' if self.reverse else 't-1'}")
        return Vec(self.model, self.model._symbol(self.name), self.size)

    def __add__(self, o): return self.t + o
    def __radd__(self, o): return o + self.t
    def __sub__(self, o): return self.t - o
    def __rsub__(self, o): return o - self.t
    def __mul__(self, o): return self.t * o
    def __rmul__(self, o): return o * self.t
    def __truediv__(self, o): return self.t / o
    def __rtruediv__(self, o): return o / self.t
    def __pow__(self, o): return self.t ** o
    def __rpow__(self, o): return o ** self.t
    def __neg__(self): return -self.t
    def __abs__(self): return abs(self.t)

    def apply(self, function):
        return self.t.apply(function)


class Scalar:
    """One number per sequence and step: a reduction over the units of a vector
    (``m.sum(v)``, ``m.mean(v)``) or an expression of reductions and numbers. With a
    vector it acts on every unit (``v - m.mean(v)``)."""

    __array_priority__ = 100

    def __init__(self, model, expr):
        self.model, self.expr = model, sp.sympify(expr)

    def _combine(self, other, op, symbol):
        if isinstance(other, (Vec, State)):
            # the vector's own method keeps the operands' order (op is written a, b)
            vec = other.t if isinstance(other, State) else other
            if vec.model is not self.model:
                raise DefinitionError("vectors from two different models combined")
            return Vec(self.model, op(self.expr, vec.expr), vec.size)
        if isinstance(other, Scalar):
            if other.model is not self.model:
                raise DefinitionError("scalars from two different models combined")
            return Scalar(self.model, op(self.expr, other.expr))
        if isinstance(other, (int, float, sp.Expr)):
            other = sp.sympify(other)
            loose = sorted(s.name for s in other.free_symbols)
            if loose:
                raise DefinitionError(
                    f"'{self.expr} {symbol} {other}' uses the SymPy symbol(s) {loose}, "
                    "which are not vectors of the model")
            return Scalar(self.model, op(self.expr, other))
        return NotImplemented

    def __add__(self, o): return self._combine(o, lambda a, b: a + b, "+")
    def __radd__(self, o): return self._combine(o, lambda a, b: b + a, "+")
    def __sub__(self, o): return self._combine(o, lambda a, b: a - b, "-")
    def __rsub__(self, o): return self._combine(o, lambda a, b: b - a, "-")
    def __mul__(self, o): return self._combine(o, lambda a, b: a * b, "*")
    def __rmul__(self, o): return self._combine(o, lambda a, b: b * a, "*")
    def __truediv__(self, o): return self._combine(o, lambda a, b: a / b, "/")
    def __rtruediv__(self, o): return self._combine(o, lambda a, b: b / a, "/")
    def __pow__(self, o): return self._combine(o, lambda a, b: a ** b, "**")
    def __rpow__(self, o): return self._combine(o, lambda a, b: b ** a, "**")
    def __neg__(self): return Scalar(self.model, -self.expr)

    def apply(self, function):
        """A scalar SymPy function of the scalar: ``sqrt(var + eps)``."""
        expr = function(self.expr)
        _check_function(function, expr)
        return Scalar(self.model, expr)

    def __repr__(self):
        return f"Scalar({self.expr})"


class Matrix:
    """A weight matrix; ``W @ v`` is a linear node of the step."""

    def __init__(self, model, name, rows, cols):
        self.model, self.name, self.rows, self.cols = model, name, rows, cols

    def __matmul__(self, vec):
        return self.model._linear(self, vec)

    def __getitem__(self, index):
        raise DefinitionError(
            f"{self.name}[{index!r}]: only an embedding table is indexed, by a token "
            f"input; declare it with m.embedding('{self.name}', '{self.rows}', "
            f"'{self.cols}') and the input with m.tokens(...)")

    def __repr__(self):
        return f"Matrix({self.name}, ({self.rows}, {self.cols}))"


class Tokens:
    """The integer input of a token model (``m.tokens``): x_t in [0, vocab). It has no
    vector value, so no arithmetic: an embedding looks it up, ``E[x]``."""

    def __init__(self, model, name, vocab):
        self.model, self.name, self.vocab = model, name, vocab

    def _refuse(self, *_):
        raise DefinitionError(
            f"the token input '{self.name}' is an integer index, not a vector: look it "
            f"up in an embedding first (E = m.embedding('E', size, '{self.vocab}'); "
            f"E[{self.name}])")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _refuse
    __truediv__ = __rtruediv__ = __pow__ = __rpow__ = __neg__ = __abs__ = _refuse
    __rmatmul__ = apply = _refuse

    def __repr__(self):
        return f"Tokens({self.name}, vocab={self.vocab})"


class Embedding(Matrix):
    """A (rows, vocab) table whose column ``E[x]`` is looked up by a token input: the
    product E @ onehot(x_t), a linear node of the step. It is still a matrix
    (``E @ v`` of a vector of size vocab is the plain product)."""

    def __getitem__(self, tokens):
        return self.model._lookup(self, tokens)

    def __repr__(self):
        return f"Embedding({self.name}, ({self.rows}, {self.cols}))"


def _elementwise(sympy_function):
    """Lift a scalar SymPy function to one that maps Vecs elementwise."""

    def lifted(v):
        if isinstance(v, State):
            v = v.t
        if isinstance(v, Tokens):
            v.apply(sympy_function)  # refused, with the reason
        if isinstance(v, (Vec, Scalar)):
            return v.apply(sympy_function)
        return sympy_function(v)

    lifted.__name__ = getattr(sympy_function, "__name__", "f")
    lifted.__doc__ = f"Elementwise {lifted.__name__}."
    return lifted


tanh = _elementwise(sp.tanh)
exp = _elementwise(sp.exp)
log = _elementwise(sp.log)
sigmoid = _elementwise(functions.sigmoid)
softplus = _elementwise(functions.softplus)
relu = _elementwise(functions.relu)
sqrt = _elementwise(sp.sqrt)
absolute = _elementwise(sp.Abs)


def _elementwise_pair(sympy_function, name):
    """Lift a two-argument SymPy function (Max, Min) to vectors of one size, or a
    vector and a number: ``maximum(u, 0)``, ``minimum(u, v)``."""

    def lifted(a, b):
        a, b = (v.t if isinstance(v, State) else v for v in (a, b))
        for v in (a, b):
            if isinstance(v, Tokens):
                v.apply(sympy_function)  # refused, with the reason
        if not isinstance(a, Vec) and not isinstance(b, Vec):
            return sympy_function(a, b)
        vec = a if isinstance(a, Vec) else b
        if isinstance(a, Vec) and isinstance(b, Vec) and a.size != b.size:
            raise DefinitionError(f"shape mismatch in {name}({a.expr}, {b.expr}): sizes "
                                  f"{a.size} and {b.size} differ")
        # Vec arithmetic checks the other operand (a number, or a vector of the model).
        a, b = (v if isinstance(v, Vec) else vec * 0 + v for v in (a, b))
        return Vec(vec.model, sympy_function(a.expr, b.expr), vec.size)

    lifted.__name__ = name
    lifted.__doc__ = f"Elementwise {name} of two vectors (or a vector and a number)."
    return lifted


maximum = _elementwise_pair(sp.Max, "max")
minimum = _elementwise_pair(sp.Min, "min")

_ALLOWED_FUNCTIONS = set(functions.CUSTOM.values())
_CHECKED_FUNCTIONS = {}


def _check_function(function, applied):
    """Refuse, on the line that applies it, a function SymPy cannot differentiate.
    ``applied`` is function(vector); a function found fine once is not checked again."""
    try:
        if _CHECKED_FUNCTIONS.get(function):
            return
    except TypeError:  # unhashable
        pass
    ok = _differentiability_problem(function(sp.Dummy("v", real=True)), "") is None
    if not ok:
        raise DefinitionError(_differentiability_problem(applied, str(applied)))
    try:
        _CHECKED_FUNCTIONS[function] = True
    except TypeError:
        pass


def _differentiability_problem(expr, what):
    """None, or why SymPy cannot differentiate expr (a message naming the function)."""
    expr = sp.sympify(expr)
    for call in expr.atoms(sp.Function):
        if isinstance(call, sp.core.function.AppliedUndef) and \
                type(call) not in _ALLOWED_FUNCTIONS:
            return (f"{what} uses the undefined function '{call.func}': define it as a "
                    "SymPy expression or a sympy.Function with fdiff")
    for s in sorted(expr.free_symbols, key=lambda s: s.name):
        derivative = sp.diff(expr, s)
        bad = derivative.atoms(sp.Derivative, sp.Subs, sp.DiracDelta)
        if bad:
            first = sorted(bad, key=str)[0]
            inner = first.expr if isinstance(first, (sp.Derivative, sp.Subs)) else first
            head = getattr(inner, "func", inner)
            return (f"{what} is not differentiable with respect to '{s.name}': SymPy "
                    f"cannot differentiate '{getattr(head, '__name__', head)}' (it "
                    f"gives {first})")
    return None


#: Each kind of declared name, in words (refusals and "already defined" messages).
_KINDS = {"input": "an input", "state": "a state", "prev": "the previous value of a state",
          "matrix": "a matrix", "param": "a vector parameter", "node": "a node"}


def _refuse_name(name, kind, what):
    """A DefinitionError naming the clash when ``name`` cannot name ``what`` in
    generated code (derive/naming.py decides)."""
    problem = naming.identifier_problem(name, kind)
    if problem:
        raise DefinitionError(
            f"cannot name {what} {name!r}: {problem}; the model's names become variable "
            "names in the generated code, so choose another")


class Model:
    """A recurrent model under definition. See the module docstring."""

    def __init__(self, name, sizes):
        _refuse_name(name, "model", "the model")
        self.name = name
        self.sizes = tuple(sizes)
        for size in self.sizes:
            _refuse_name(size, "size", "a size")
        if len(set(self.sizes)) != len(self.sizes):
            raise DefinitionError(f"size names repeat: {self.sizes}")
        self.inputs = {}  # name -> size
        self.tokens_input = None  # the input's name when it is integer tokens (m.tokens)
        self.states = {}  # name -> State
        self.params = {}  # name -> ParamDef
        self.nodes = []  # NodeDef, in the order of the step
        self.output_node = None
        self.loss = None
        self.loss_at = "every"
        self._symbols = {}  # name -> (kind, size)
        self._defined_at = {}  # name -> 'file:line' of its definition
        self._counter = 0
        self._linear_nodes = set()

    # -- declarations ---------------------------------------------------------
    def _symbol(self, name):
        return sp.Symbol(name, real=True)

    def _declare(self, name, kind, size, minted=False):
        # s_prev is derived from the state's checked name; a minted name is safe by
        # construction (_minted)
        if kind != "prev" and not minted:
            _refuse_name(name, kind, _KINDS[kind])
        if name in self.sizes:
            raise DefinitionError(f"name '{name}' is already defined as a size")
        if name in self._symbols:
            what = _KINDS[self._symbols[name][0]]
            if name == self.output_node:
                what = "the readout, by output()"
            where = self._defined_at.get(name)
            raise DefinitionError(f"name '{name}' is already defined, as {what}"
                                  + (f" at {where}" if where else ""))
        if size not in self.sizes:
            raise DefinitionError(
                f"'{name}' has size '{size}', which is not one of the model's sizes "
                f"{self.sizes}")
        self._symbols[name] = (kind, size)
        self._defined_at[name] = _caller_location()

    def input(self, name, size):
        """An input vector of the step. A model may read several (a sequence and a
        conditioning vector per step, say): a call's x is then the inputs side by side
        in the order declared, (T, B, I1 + I2 + ...), or a dict {name: (T, B, I_k)}."""
        if self.tokens_input is not None:
            raise DefinitionError(
                f"'{name}': this model's input is the token input '{self.tokens_input}', "
                "which is its only input (token and vector inputs together are not "
                "supported yet)")
        self._declare(name, "input", size)
        self.inputs[name] = size
        return Vec(self, self._symbol(name), size)

    def tokens(self, name, vocab):
        """The input as integer tokens x_t in [0, vocab) (x: (T, B) integers), read
        only through an embedding table: ``E[x]`` (see ``embedding``)."""
        if self.inputs:
            raise DefinitionError(
                f"'{name}': a token input is its model's only input, and this model "
                f"already reads {sorted(self.inputs)} (token and vector inputs together "
                "are not supported yet)")
        self._declare(name, "input", vocab)
        self.inputs[name] = vocab
        self.tokens_input = name
        return Tokens(self, name, vocab)

    def embedding(self, name, rows, vocab):
        """An embedding table of shape (rows, vocab): ``E[x]`` is its column x_t, a
        vector of size ``rows``. Initialised and penalised (L2) as a weight matrix."""
        self.matrix(name, rows, vocab)
        return Embedding(self, name, rows, vocab)

    def state(self, name, size, reverse=False):
        """A recurrent state; its initial value is an argument of the trainer.

        ``reverse=True``: the backward direction of a bidirectional layer. The state
        runs from t = T-1 down to 0, ``s.prev`` is s_{t+1}, its initial value is its
        value at t = T and its final value the one at t = 0. A forward state's update
        may not read a reverse state, nor the reverse one a forward one (no order
        computes both); the readout may read both."""
        location = _caller_location()
        if not isinstance(reverse, bool):
            raise DefinitionError(f"reverse must be True or False, got {reverse!r}")
        self._declare(name, "state", size)
        self._declare(f"{name}_prev", "prev", size)
        st = State(self, name, size, location, reverse)
        self.states[name] = st
        return st

    def matrix(self, name, rows, cols):
        """A full weight matrix of shape (rows, cols)."""
        self._declare(name, "matrix", rows)
        if cols not in self.sizes:
            raise DefinitionError(f"'{name}' has size '{cols}', which is not one of the "
                                  f"model's sizes {self.sizes}")
        self.params[name] = ParamDef(name, (rows, cols), "matrix", "weight",
                                     _caller_location())
        return Matrix(self, name, rows, cols)

    def _vector_param(self, name, size, role):
        self._declare(name, "param", size)
        self.params[name] = ParamDef(name, (size,), "vector", role, _caller_location())
        return Vec(self, self._symbol(name), size)

    def bias(self, name, size):
        """A bias vector, added elementwise; initialised to zero."""
        return self._vector_param(name, size, "bias")

    def gain(self, name, size):
        """A gain (a normalisation's scale, multiplied elementwise); initialised to one."""
        return self._vector_param(name, size, "gain")

    def diagonal(self, name, size):
        """A diagonal weight (a vector multiplied elementwise, e.g. a peephole)."""
        return self._vector_param(name, size, "diagonal")

    # -- the step -------------------------------------------------------------
    def _check_expr(self, expr, what):
        """Refuse undefined symbols and functions SymPy cannot differentiate."""
        # A size's name stands for its value (a mean divides by it).
        unknown = [s for s in expr.free_symbols
                   if s.name not in self._symbols and s.name not in self.sizes]
        if unknown:
            raise DefinitionError(
                f"{what} uses undefined symbol(s) {sorted(s.name for s in unknown)}")
        problem = _differentiability_problem(expr, what)
        if problem:
            raise DefinitionError(problem)

    def _minted(self, stem):
        """The name of a vector the definition did not name (a product W @ v): ``stem``
        when a user could have written it and it is free, else ``_p<k>``, in the
        generator's own namespace (a leading underscore, which no user name has)."""
        if naming.identifier_problem(stem, "node") is None and stem not in self._symbols \
                and stem not in self.sizes:
            return stem
        k = 1
        while f"_p{k}" in self._symbols:
            k += 1
        return f"_p{k}"

    def _materialize(self, vec, name=None, minted=False):
        """The name of a node holding ``vec``: the vector itself when it already is
        a named symbol, otherwise a new elementwise node."""
        if isinstance(vec, State):
            vec = vec.t
        if isinstance(vec, Tokens):
            vec._refuse()
        if not isinstance(vec, Vec):
            raise DefinitionError(f"expected a vector, got {vec!r}")
        if name is None and isinstance(vec.expr, sp.Symbol):
            return vec.expr.name
        if name is None:
            self._counter += 1
            name = f"u{self._counter}"
            while name in self._symbols:
                self._counter += 1
                name = f"u{self._counter}"
        self._check_expr(vec.expr, f"the expression for '{name}'")
        self._declare(name, "node", vec.size, minted=minted)
        self.nodes.append(NodeDef(name, vec.size, "elementwise", expr=vec.expr,
                                  location=_caller_location()))
        return name

    def _lookup(self, table, tokens):
        """E[x]: the linear node E @ onehot(x_t), a gather in generated code."""
        if not isinstance(tokens, Tokens) or tokens.model is not self:
            raise DefinitionError(
                f"{table.name}[{getattr(tokens, 'expr', tokens)!r}]: an embedding is "
                "indexed by the model's token input (x = m.tokens('x', vocab=...)), "
                "not by a vector or a number")
        if tokens.vocab != table.cols:
            raise DefinitionError(
                f"shape mismatch in '{table.name}[{tokens.name}]': {table.name} has shape "
                f"({table.rows}, {table.cols}), so it looks up tokens in [0, {table.cols}), "
                f"but '{tokens.name}' has vocab {tokens.vocab}")
        for n in self.nodes:  # the same lookup written twice is one vector
            if n.kind == "linear" and (n.weight, n.source) == (table.name, tokens.name):
                return Vec(self, self._symbol(n.name), table.rows)
        # Not in _linear_nodes: a product may read a lookup's array as it is (a group
        # of its own, plan.py), so W @ E[x] needs no copy of it.
        name = self._minted(f"{table.name}_{tokens.name}")
        self._declare(name, "node", table.rows, minted=True)
        self.nodes.append(NodeDef(name, table.rows, "linear", weight=table.name,
                                  source=tokens.name, location=_caller_location(),
                                  lookup=True))
        return Vec(self, self._symbol(name), table.rows)

    def _linear(self, matrix, vec):
        if isinstance(vec, State):
            vec = vec.t
        if isinstance(vec, Tokens):
            vec._refuse()
        if not isinstance(vec, Vec):
            raise DefinitionError(f"{matrix.name} @ {vec!r}: the right side must be a vector")
        if vec.size != matrix.cols:
            raise DefinitionError(
                f"shape mismatch in '{matrix.name} @ {vec.expr}': {matrix.name} has shape "
                f"({matrix.rows}, {matrix.cols}) but '{vec.expr}' has size {vec.size}")
        if not {s.name for s in vec.expr.free_symbols} - set(self.params) - set(self.sizes):
            raise DefinitionError(
                f"'{matrix.name} @ {vec.expr}': the vector is the same at every step (it "
                "reads no input, state or node, only parameters and numbers), so the "
                f"product is a constant: use a bias of size {matrix.rows} instead")
        source = self._materialize(vec)
        if source in self._linear_nodes:
            # A product of a product: store the inner one as a vector of its own, so
            # every matrix product reads a whole contiguous array.
            source = self._materialize(vec, name=self._minted(f"{source}_v"), minted=True)
        for n in self.nodes:  # the same product written twice is one vector
            if n.kind == "linear" and (n.weight, n.source) == (matrix.name, source):
                return Vec(self, self._symbol(n.name), matrix.rows)
        name = self._minted(f"{matrix.name}_{source}")
        self._linear_nodes.add(name)
        self._declare(name, "node", matrix.rows, minted=True)
        self.nodes.append(NodeDef(name, matrix.rows, "linear", weight=matrix.name,
                                  source=source, location=_caller_location()))
        return Vec(self, self._symbol(name), matrix.rows)

    # -- reductions over the units of a vector ----------------------------------
    def _fresh(self, stem):
        k = 1
        while f"{stem}{k}" in self._symbols or f"{stem}{k}" in self.sizes:
            k += 1
        return f"{stem}{k}"

    def _reduction(self, vec, summand, name, what, stem="r"):
        if isinstance(vec, State):
            vec = vec.t
        if not isinstance(vec, Vec):
            raise DefinitionError(f"{what}() needs a vector, got {vec!r}")
        if vec.model is not self:
            raise DefinitionError(f"{what}() of a vector of another model")
        name = name or self._fresh(stem)
        expr = summand(vec.expr, self._symbol(vec.size))
        self._check_expr(expr, f"the summand of '{name}'")
        self._declare(name, "node", vec.size)
        self._symbols[name] = ("node", SCALAR)
        self.nodes.append(NodeDef(name, SCALAR, "reduction", expr=expr, over=vec.size,
                                  location=_caller_location()))
        return Scalar(self, self._symbol(name))

    def sum(self, vec, name=None):
        """The sum of a vector's units, sum_k vec_k: one number per sequence and step
        (a Scalar), stored by the forward pass. Its adjoint sums the contributions of
        what reads it over their units; each unit of ``vec`` gets it times the
        summand's derivative (``sympy.diff``)."""
        return self._reduction(vec, lambda e, n: e, name, "sum")

    def mean(self, vec, name=None):
        """The mean of a vector's units, sum_k vec_k / n for a vector of size n."""
        return self._reduction(vec, lambda e, n: e / n, name, "mean")

    def _normed(self, vecs, what):
        vecs = [v.t if isinstance(v, State) else v for v in vecs]
        if not vecs or not all(isinstance(v, Vec) for v in vecs):
            raise DefinitionError(f"{what}() needs one or more vectors, got {vecs!r}")
        sizes = sorted({v.size for v in vecs})
        if len(sizes) > 1:
            raise DefinitionError(f"{what}() of vectors of sizes {sizes}: normalising "
                                  "them together needs one size")
        return vecs

    @staticmethod
    def _affine(vecs, normed, gain, bias, what):
        out = []
        for i, v in enumerate(normed):
            for p, kind in ((gain, "gain"), (bias, "bias")):
                p = p[i] if isinstance(p, (list, tuple)) else p
                if p is None:
                    continue
                if not isinstance(p, Vec) or p.size != vecs[i].size:
                    raise DefinitionError(f"{what}(): the {kind} must be a vector of size "
                                          f"{vecs[i].size}, got {p!r}")
                v = v * p if kind == "gain" else v + p
            out.append(v)
        return out[0] if len(out) == 1 else out

    def layernorm(self, *vecs, gain=None, bias=None, eps=1e-5, name=None):
        """Layer normalisation, as torch.nn.LayerNorm: (v - mean) / sqrt(var + eps) *
        gain + bias, mean and (biased) variance over the units of v, or over the units
        of several vectors of one size taken together (their concatenation: LayerNorm
        of an LSTM's four gates). ``gain`` and ``bias``: a vector (parameter) each, a
        list of one per vector, or None. Two reductions, named ``mu_<name>`` and
        ``var_<name>``. Returns the normalised vector, or a list of them."""
        vecs = self._normed(vecs, "layernorm")
        n = len(vecs)
        mu = self._reduction(vecs[0], lambda e, size: sum(v.expr for v in vecs) / (n * size),
                             name and f"mu_{name}", "layernorm", "mu")
        var = self._reduction(
            vecs[0], lambda e, size: sum((v.expr - mu.expr) ** 2 for v in vecs) / (n * size),
            name and f"var_{name}", "layernorm", "var")
        scale = 1 / sqrt(var + eps)
        return self._affine(vecs, [(v - mu) * scale for v in vecs], gain, bias, "layernorm")

    def rmsnorm(self, *vecs, gain=None, eps=1e-6, name=None):
        """RMS normalisation (Zhang and Sennrich 2019): v / sqrt(mean(v^2) + eps) * gain,
        over the units of v or of several vectors of one size taken together. One
        reduction, named ``ms_<name>``. Returns the normalised vector, or a list."""
        vecs = self._normed(vecs, "rmsnorm")
        n = len(vecs)
        ms = self._reduction(vecs[0], lambda e, size: sum(v.expr ** 2 for v in vecs)
                             / (n * size), name and f"ms_{name}", "rmsnorm", "ms")
        scale = 1 / sqrt(ms + eps)
        return self._affine(vecs, [v * scale for v in vecs], gain, None, "rmsnorm")

    def node(self, name, vec):
        """Name an intermediate vector (a gate, say): it is stored by the forward
        pass and derivatives are written through it."""
        self._materialize(vec, name)
        return Vec(self, self._symbol(name), vec.size)

    def expr(self, expression, **vectors):
        """A user's SymPy expression over symbols named by the keywords, each bound
        to a Vec of one common size: ``m.expr(log(exp(a) + exp(b)), a=u, b=v)``."""
        expression = sp.sympify(expression)
        vectors = {k: (v.t if isinstance(v, State) else v) for k, v in vectors.items()}
        for v in vectors.values():
            if isinstance(v, Tokens):
                v._refuse()
        unknown = sorted(s.name for s in expression.free_symbols if s.name not in vectors)
        if unknown:
            raise DefinitionError(f"expression {expression} uses undefined symbol(s) "
                                  f"{unknown}; bind them as keyword arguments")
        sizes = {v.size for v in vectors.values()}
        if len(sizes) > 1:
            raise DefinitionError(f"shape mismatch in {expression}: sizes {sorted(sizes)}")
        if not sizes:
            raise DefinitionError(f"expression {expression} uses no vector")
        problem = _differentiability_problem(expression, f"expression {expression}")
        if problem:
            raise DefinitionError(problem)
        mapping = {s: vectors[s.name].expr for s in expression.free_symbols}
        return Vec(self, expression.xreplace(mapping), sizes.pop())

    def update(self, state, vec):
        """s_t = vec: the state's value at the end of the step."""
        if not isinstance(state, State) or state.model is not self:
            raise DefinitionError(f"update() needs a state of this model, got {state!r}")
        if state.updated:
            raise DefinitionError(f"state '{state.name}' is updated twice")
        if isinstance(vec, State):
            vec = vec.t
        if isinstance(vec, Tokens):
            vec._refuse()
        if not isinstance(vec, Vec):
            raise DefinitionError(f"update({state.name}, ...) needs a vector, got {vec!r}")
        if vec.size != state.size:
            raise DefinitionError(
                f"shape mismatch in update of '{state.name}': the state has size "
                f"{state.size}, the expression {vec.size}")
        self._check_expr(vec.expr, f"the update of '{state.name}'")
        self.nodes.append(NodeDef(state.name, state.size, "elementwise", expr=vec.expr,
                                  location=_caller_location()))
        state.updated = True
        return state.t

    def output(self, vec, loss, at="every"):
        """The readout z_t and its loss; ``at`` is "every" step or only the "last"."""
        if self.output_node is not None:
            raise DefinitionError("output() called twice")
        if isinstance(loss, str):
            if loss not in losses.BUILTIN:
                raise DefinitionError(f"unknown loss {loss!r}; built-in losses are "
                                      f"{sorted(losses.BUILTIN)}")
            loss = losses.BUILTIN[loss]
        if not isinstance(loss, losses.Loss):
            raise DefinitionError(f"loss must be a derive.Loss or a name, got {loss!r}")
        if at not in ("every", "last"):
            raise DefinitionError(f"at must be 'every' or 'last', got {at!r}")
        if isinstance(vec, State):
            vec = vec.t
        if "z" in self._symbols:
            kind = self._symbols["z"][0]
            raise DefinitionError(
                f"output() names the readout 'z', but 'z' is already defined as "
                f"{_KINDS[kind]} at {self._defined_at.get('z')}: rename that one")
        clash = sorted({sym.name for sym, _ in loss.sums} & {getattr(vec, "size", None)})
        if clash:
            raise DefinitionError(
                f"the loss {loss.name!r} has a sum named '{clash[0]}', the name of the "
                "readout's size: rename the sum (a keyword of custom_loss) or the size")
        # Always a node of its own, so the readout never sits inside the recurrence.
        self.output_node = self._materialize(vec, name="z")
        self.loss, self.loss_at = loss, at
        return Vec(self, self._symbol(self.output_node), vec.size)

    def size_of(self, name):
        return self._symbols[name][1]

    def kind_of(self, name):
        return self._symbols[name][0]
