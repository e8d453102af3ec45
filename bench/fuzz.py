#!/usr/bin/env python
"""A generator fuzzer: random cells through the public definition API, checked end to end.

    python bench/fuzz.py --cells 200 --seed 0            # summary on stdout
    python bench/fuzz.py --cell 17 --seed 0              # one cell: its source and result
    python bench/fuzz.py --show 17 --seed 0              # only its definition source
    python bench/fuzz.py --case tests/fuzz_cases/*.py    # definition files (regressions)

Design
------
*Cells.* ``generate_spec(seed, i)`` draws cell i of a run from ``random.Random("seed:i")``
alone, so a cell is reproducible without the rest of its run. A spec is plain JSON
(sizes, 1 to 3 inputs, 1 to 3 states of 1 or 2 sizes, forward or reverse, parameters,
a body of named nodes and state updates, an output and a loss); ``cell_source(spec)``
prints it as a definition file (``def model(): ...``) and that source is what is
tested, so a failure's shrunk cell is printed exactly as it ran. Expressions mix
matrix products, biases, diagonals, tanh/sigmoid/softplus/exp/log/sqrt/erf/atan, relu/Abs/Max/Min,
sums, products, quotients ``a / (1 + g*g)``, reductions over the units of a vector
(``m.sum``, ``m.mean`` as a scalar factor or term of a vector of any size, ``m.layernorm``
and ``m.rmsnorm`` with a generous eps, sometimes with a gain), powers (2, 3, -1, -2, 1/2, 3/2 and
``(1 + b*b)**2`` in denominators), user expressions through ``m.expr``, inline
``m.node``, reads of states at t-1 (``s.prev``) and at t (``s.t`` or, in some cells,
the bare ``State``), outputs with each built-in loss and a dozen custom losses
(``at="every"``/``"last"``), and Python spellings a user may try (``abs(v)``,
``2 ** v``, ``s ** 2`` on a State). A third of the cells use awkward names, for the
model, the sizes, every vector, the loss and its sums: mostly unusual names a
generator should accept (Greek, NFKC-normalised letters such as ``µ`` and ``ℌ``,
one-letter names that are also kernel or loss symbols, ``x`` for a node when the
input is not ``x``, ``W_x``, ``h_t``) and sometimes names likely to be refused
(keywords, builtins, module and kernel identifiers, names shaped like generated ones
such as ``d_x``, ``h_seq``, ``P_x``, ``W_P_x``); the other two thirds use plain names
(sizes not always I/H/O), so that the math is tested even where a naming refusal
would end an awkward cell early. A few cells on purpose keep a named node that feeds
nothing (8%), write the same product twice (8%) or declare a size nothing uses (3%).

*Inputs.* Most cells read one input; ~25% two and ~5% three (``m.input`` called once
per input, MAX_INPUTS), drawn from a generator of their own so that a one-input cell is
drawn exactly as before. An input after the first has a state's size (35%), the first
input's (15%) or a size of its own; every input of such a cell is read (a product, the
input itself or times a diagonal, added to an update or the readout where nothing
read it), and expressions read it as they read any vector: in products, or
elementwise where the sizes agree. A call's x is then the inputs side by side in the
order declared (T, B, I1 + I2 + ...), which the reference splits by columns; forward()
of the dict {name: (T, B, I_k)} must give the same numbers. A token input (20% of the
one-input cells that read it, drawn from a generator of its own) stays the only input
of its model.

*Reverse states.* In ~15% of the cells with two or three states some states (now and
then all) run in reverse (``m.state(..., reverse=True)``: t from T-1 down to 0,
``s.prev`` the value at t+1), and in 4% of the one-state cells the one; which ones is
drawn from a generator of its own, so that a cell without one is drawn exactly as
before. The engine refuses a node on the recurrent path that reads both directions,
so each update and the nodes drawn for it read vectors of its own direction only (or
of none: the inputs, and nodes of inputs alone), and a node that would feed nothing
joins the next update of its direction; the readout reads both. For such a cell the
algorithms that run forward in time only (tbptt, artbp, rtrl, checkpoint) must be
missing from ``module.ALGORITHMS`` and refused with a ValueError that names the
reverse state.

*Conditioning.* log and sqrt only see positive arguments (``1 + u*u``, ``2 + tanh u``,
``softplus u + 1/2``, ``exp(tanh u)``...), exp only bounded ones, parameters are
N(0, 0.3), sizes 2-3, T = 3-4, B = 2. Kinks (relu, Abs, Max, Min) are drawn rarely
and handled by distance: the reference evaluation records how far every kink
argument (``a`` of relu(a)/Abs(a), ``a - b`` of Max/Min) comes to its kink over the
whole trajectory; below 1e-3 the data are redrawn (5 tries), and when none is far
enough the finite-difference comparison is skipped for that cell (recorded; the
algorithms and the forward pass are still compared). A perturbation of 1e-6 (or
2e-4 for the confirming stencil) moves a pre-activation by far less than 1e-3 with
these parameter scales, so a kink never falls inside a difference quotient.

*Checks* of each cell: (a) every algorithm of ``module.ALGORITHMS`` (bptt, naive,
tbptt with k1 = k2 = T, epochwise, rtrl, artbp with c = 0) against central finite
differences (eps 1e-6) of the module's own loss, max relative error 1e-6 with a 1e-3
floor (codegen.gradcheck's measure, reimplemented here); an element over the
tolerance is re-measured with the fourth-order five-point stencil (h = 1e-4; below
16 eps |L| / h, the loss's own rounding, it cannot tell), and
only if that also disagrees is it a wrong gradient; (b) the algorithms against bptt
to 1e-10, loss values included; (c) ``forward()`` (predictions and final states) and
the module's loss value against an evaluation of the Model object that does not go
through ``derive()`` or the generator: each NodeDef's expression through
``sympy.lambdify`` with this file's own NumPy functions, linear nodes as ``W @ v``,
the Loss's sums, value and prediction evaluated per step, the loss convention
sum w l / sum w + l2/2 sum ||W||^2. A reverse state's previous value at step t is its
value at t+1 (state0 at t = T) and its final value the one at t = 0: the reference
first runs the reverse states from the last step down (the nodes of that direction),
then every node from the first step up. It shares only the definition API (model.py:
how a line of the definition becomes a NodeDef) with the code under test.

*Outcomes.* ok; refused (DefinitionError or LossError while running the definition
or in derive/render, or a ValueError raised from derive/ or codegen/ there; its
message is recorded, grouped with names and paths blanked); failures by class:
definition-crash (any other exception while running the definition: the API
itself failed, e.g. an operator a State lacks), generate-crash, import-crash,
numba-typing (a Numba error in a compiled cell), wrong-gradient, algorithms-disagree,
wrong-forward (predictions, final states or the loss value), other (any other
exception of a call, with its traceback), timeout (no answer within the per-cell
limit; the worker is killed and replaced).

*Cost and processes.* Numba compiles each module's ~10-15 kernels lazily, 20-60 s a
cell on this machine; with NUMBA_DISABLE_JIT=1 the same kernels run as plain Python
at these tiny sizes in well under a second. NUMBA_DISABLE_JIT is read once, when
Numba is imported, so cells run in worker processes (``--worker``, a JSON line per
cell on stdin/stdout) started with the flag set or unset: most cells without JIT
(which checks the printed math and every Python-level error but not Numba's
typing) and every ``--jit-every``-th cell compiled. A worker runs many cells (its
imports cost 1.5-3.5 s, a JIT-off cell ~0.5 s: one process per cell measured 5x
slower, 2.4 s a cell against 0.48 s) and is replaced after ``--recycle`` cells, on a
timeout or when it dies. Workers start with PYTHONHASHSEED=0, so a cell generates
the same code on every run, and with BPTTGEN_POISON_WORKSPACE=1, so that a kernel
reading a work array that the layout says it writes first gives NaN. A compiled
cell's module is written under ``--cache-dir`` (a folder per source hash, rewritten
only when it changed), so a rerun finds Numba's cache: the suite's compiled cell
takes ~25-45 s cold, ~5 s warm.

*Shrinking* is this file's own, not Hypothesis's: cells must run in killable
subprocesses whose JIT mode is fixed at start (Hypothesis runs and shrinks a test
in-process), a compiled evaluation costs tens of seconds, and a cell must be a pure
function of (seed, index) so ``--cell`` and the suite can pin it. The shrinker works
on the spec's structure, greedily (after a success the next pass resumes where the
last one succeeded), accepting only a smaller cell (spec_measure) that fails with the
same signature (class; the call and exception type of a crash; the algorithms
involved): all names plain + sse + every at once, drop a state, every state forward,
drop one of several inputs (a product of it, or a read of it, becomes a plain vector;
the sizes only it used go too), inline or drop a named node, replace a subexpression
by one of its operands or by a plain vector, unwrap ``m.node``/``m.expr`` forms, plain
names for awkward ones, merge sizes, a built-in loss, ``at="every"``, give one use of
a shared parameter its own copy, drop unused sizes; parameters no longer used are
dropped from every candidate (an unused parameter is refused). A plain vector put in
place of a subexpression reads a state only of a direction its place accepts (an
update's own, a node's own), so a candidate stays a valid bidirectional cell. A
failure of a compiled cell is shrunk with JIT off whenever the cell fails there too
(with the JIT-off signature: a Numba typing error is often a Python-level error of
the same kernels), else compiled, with a twentieth of the budget.
``--shrink-refusal REGEX`` shrinks refusals too (for a refusal of a valid cell).
Shrunk cells are printed, and written with ``--save-cases DIR``.

Known limit: sums inside a custom loss use z, d, the shift and K only (no kinks), and
targets of index losses are drawn uniformly.
"""

import argparse
import collections
import hashlib
import json
import keyword
import os
import random
import re
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS = os.path.abspath(__file__)

FD_TOL = 1e-6  # max relative error of a gradient against finite differences
AGREE_TOL = 1e-10  # between algorithms, and forward against the reference
#: The algorithms that run forward in time only: refused for a model with a reverse state.
FORWARD_ONLY = ("tbptt", "artbp", "rtrl", "checkpoint")
KINK_MARGIN = 1e-3  # closest a kink argument may come to its kink for the FD check
FAILURE_CLASSES = ("definition-crash", "generate-crash", "import-crash", "numba-typing",
                   "wrong-gradient", "algorithms-disagree", "wrong-forward", "other",
                   "timeout")

# ------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------

KEYWORDS = ["lambda", "if", "for", "class", "def", "return", "None", "True", "import",
            "pass", "in", "is", "not", "and", "or", "with", "yield", "global", "del",
            "try", "async", "await", "match", "case", "type", "_"]
BUILTINS = ["max", "min", "range", "len", "abs", "sum", "print", "float", "int", "list",
            "dict", "id", "input", "object", "round", "pow", "exp", "tanh", "sigmoid",
            "relu", "step", "softplus", "log", "sqrt"]
MODULE_NAMES = ["np", "math", "numba", "njit", "cuda", "prange", "runtime", "online", "sp",
                "sympy", "os", "sys", "numpy", "crt"]
KERNEL_NAMES = ["T", "B", "TB", "NP", "carry", "targets", "weights", "scale", "loss",
                "total", "y", "m", "S", "D", "K", "t", "b", "k", "i", "j", "w", "g", "s",
                "ws", "sizes", "params", "grads", "grad", "dtype", "plan", "args", "mask",
                "l2", "seed", "c", "state0", "x", "z", "d", "O", "I", "H", "t_hi", "t_lo",
                "scratch", "acc", "out", "row", "n", "a", "NAME", "SIZES", "PARAMS",
                "STATES", "SPEC", "ALGORITHMS", "Trainer", "forward", "init_params",
                "rtrl", "loss_and_grads", "final", "first", "k1", "k2", "algorithm"]
SHAPED = ["d_x", "delta_h", "P_x", "W_P", "x_seq", "h_dot", "h_prev", "z_seq", "y_seq",
          "d_z", "dW_P_x", "P_h_prev", "W_P_x", "delta_x", "d_h_prev", "h_seq", "u1", "u2",
          "W_x", "x_v", "_x", "__x", "x__", "a1", "a_1_", "h0", "h_0", "X", "Z", "W_hh1",
          "h1_2", "x0", "v_1", "z_t", "zz"]
GREEK = ["α", "β", "λ", "θ", "Δh", "σ", "µ", "μ", "ℓ", "ℌ", "ω_1", "ξ"]
#: Unusual names a user may well write, which a careful generator should accept.
ODD = GREEK + ["X", "Z", "a1", "a_1_", "h0", "h_0", "zz", "W_P", "W_hh1", "h1_2", "x0", "v_1",
               "z_t", "m", "S", "D", "K", "i", "j", "k", "n", "a", "b", "c", "y", "d", "x",
               "t", "O", "I", "H", "u1", "u2", "W_x", "x_v", "W", "Wx", "hh", "e", "E", "N",
               "p", "q", "r", "f", "g", "o", "l", "L", "delta", "lambda_", "sigma", "theta",
               "Omega", "alpha1", "h_t", "h_tm1", "prev", "seq", "dot", "rows", "z_"]
#: Names that clash with Python or with what generated code binds (likely refused).
AWKWARD = {"keyword": KEYWORDS, "builtin": BUILTINS, "module": MODULE_NAMES,
           "kernel": KERNEL_NAMES, "shaped": SHAPED}
DERIVED_FORMS = ["d_{}", "delta_{}", "P_{}", "{}_seq", "{}_dot", "W_P_{}", "dW_{}",
                 "{}_v", "d_P_{}", "{}_rows", "scratch_{}", "_{}"]
PLAIN_SIZES = {"I": ["X", "In", "U", "I"], "H": ["N", "Hd", "M", "H"], "G": ["F", "G2", "J"],
               "O": ["Y", "C", "Out", "V"]}
ODD_SIZES = ["N", "M", "Hid", "n_h", "hidden", "E", "V", "D1", "H2", "h", "Q", "R", "U", "Σ",
             "n_in", "n_out", "C", "L", "W"]
AWKWARD_SIZES = ["T", "B", "TB", "np", "K", "n", "t", "b", "x", "y", "size", "N_1", "Δ",
                 "lambda", "range", "O2", "H_", "carry", "w", "NP", "sizes"]
AWKWARD_SUMS = ["S", "D", "R", "Q", "A", "loss", "total", "y", "K", "m", "d", "z",
                "lambda", "name", "value", "S_1",
                "σ", "targets", "scale", "TB"]
AWKWARD_MODELS = ["np", "math", "numba", "lambda", "test", "cell", "T", "x", "loss",
                  "generated", "codegen", "fuzz_1", "Ψ"]
AWKWARD_LOSS_NAMES = ["my loss", "it's", 'q"uote', "back\\slash", '"""', "ünï", "",
                      "a\nb", "{x}", "%s"]


class Namer:
    """Unique declared names: plain ones, or (in an awkward cell) awkward ones at times."""

    def __init__(self, rng, awkward):
        self.rng, self.awkward = rng, awkward
        self.used = set()
        self.counters = collections.Counter()

    def plain(self, stem):
        while True:
            self.counters[stem] += 1
            name = f"{stem}{self.counters[stem]}"
            if name not in self.used:
                self.used.add(name)
                return name

    def take(self, name):
        if name in self.used or not name.isidentifier() or f"{name}_prev" in self.used or \
                (name.endswith("_prev") and name[:-5] in self.used):
            return False
        self.used.add(name)
        return True

    def pick(self, stem, plain_first=None):
        """A fresh name: ``plain_first`` (e.g. 'h') if free, else stem + number;
        in an awkward cell, sometimes an awkward one."""
        rng = self.rng
        if self.awkward and rng.random() < 0.3:
            for _ in range(4):
                r = rng.random()
                if r < 0.7:
                    candidate = rng.choice(ODD)
                elif self.used and r < 0.78:
                    other = rng.choice(sorted(self.used))
                    candidate = rng.choice(DERIVED_FORMS).format(other)
                else:
                    candidate = rng.choice(AWKWARD[rng.choice(sorted(AWKWARD))])
                if self.take(candidate):
                    return candidate
        if plain_first and self.take(plain_first):
            return plain_first
        return self.plain(stem)


# ------------------------------------------------------------------------------------
# Specs: the random cell as JSON, and its definition source
# ------------------------------------------------------------------------------------
#
# Expression trees (E), lists:
#   ["in", j] ["prev", i] ["cur", i] ["node", var] ["param", var] ["mm", var, E]
#   ["f", fname, E]           fname in tanh sigmoid softplus relu exp log
#   ["apply", fname, E]       E.apply(sympy.<fname>): Abs sqrt erf atan
#   ["mexpr", key, E, E?]     m.expr(<template>, a=E, b=E)
#   ["add"|"sub"|"mul"|"div", E, E]  ["pow", E, kstr]  ["neg", E]
#   ["cadd"|"csub"|"cmul", cstr, E]   c + E, c - E, c * E
#   ["named", name, E]        m.node(name, E) inline

UNARY = ("tanh", "sigmoid", "softplus", "relu", "exp", "log")
APPLY = {"Abs": "sympy.Abs", "sqrt": "sympy.sqrt", "erf": "sympy.erf", "atan": "sympy.atan"}
MEXPR = {  # key: (template over a, b; arity)
    "max": ("sympy.Max(a, b)", 2),
    "min": ("sympy.Min(a, b)", 2),
    "lse": ("sympy.log(sympy.exp(a) + sympy.exp(b))", 2),
    "quot": ("a / (1 + b**2)", 2),
    "quot2": ("a / (1 + b * b) ** 2", 2),
    "hyp": ("sympy.sqrt(1 + a**2)", 1),
    "sqrtpos": ("sympy.sqrt(a)", 1),  # a is generated positive
    "gauss": ("sympy.exp(-a**2)", 1),
}
POS_POWERS = ["-1", "-2", "0.5", "1.5", "-0.5", "sympy.Rational(1, 2)",
              "sympy.Rational(-3, 2)", "2"]
CONSTS = ["0.5", "2", "1.5", "0.25", "1", "3"]

BUILTIN_LOSSES = ["sse", "mse", "softmax_cross_entropy", "sigmoid_bce"]
#: Custom losses: (value, sums {slot: summand}, target, prediction), in the symbols
#: z, d, shift (the loss's m), K and the sums' slots R1, R2 (renamed per cell).
CUSTOM_LOSSES = [
    ("R1", {"R1": "(z - d)**2 / (1 + (z - d)**2)"}, "vector", None),
    ("R1", {"R1": "sympy.log(sympy.cosh(z - d))"}, "vector", None),
    ("R1", {"R1": "sympy.sqrt(1 + (z - d)**2) - 1"}, "vector", None),
    ("sympy.sqrt(R1 + 1)", {"R1": "(z - d)**2"}, "vector", None),
    ("sympy.log(1 + R1) + R2 / K", {"R1": "(z - d)**2", "R2": "z**2 * d"}, "vector", None),
    ("R1 / (2 * K)", {"R1": "(z - d)**2 * (1 + d)"}, "vector", None),
    ("R1", {"R1": "softplus(z) - d * z"}, "vector", "sigmoid(z)"),
    ("R1", {"R1": "(z - d)**4 / 4 + (z - d)**2 / 2"}, "vector", None),
    ("sympy.log(R1) + shift / 2 - R2 / 2", {"R1": "sympy.exp((z - shift) / 2)", "R2": "d * z"},
     "index", "sympy.exp((z - shift) / 2) / R1"),
    ("R1**2 / (1 + R1)", {"R1": "(z - d)**2 / 2"}, "vector", None),
    ("R1", {"R1": "(z - d)**2 / (1 + d**2)**2"}, "vector", None),
    ("R1 + R1**2 / (1 + R2)", {"R1": "(z - d)**2 / 2", "R2": "z**2"}, "vector", None),
    ("R1", {"R1": "(z - d)**2 / 2"}, "vector", "sympy.tanh(z)"),
    ("sympy.log(R1) + shift - R2", {"R1": "sympy.exp(z - shift)", "R2": "d * z"}, "index",
     "sympy.exp(z - shift) / R1"),
]
MAX_INPUTS = 3  # inputs of a cell (Generator.draw_inputs)
#: Extra input names tried first (a cell's first input is x, u, inp or xt).
EXTRA_INPUT_NAMES = ["x2", "u2", "v", "w_in", "cond", "x"]
EXTRA_INPUT_SIZES = ["I2", "J", "In2", "P", "A"]


class Generator:
    def __init__(self, rng, directions=None, inputs=None):
        self.rng = rng
        # Which states run in reverse and how many inputs there are is drawn from
        # generators of their own, so that a cell with one input and no reverse state
        # draws exactly what it drew before either was fuzzed.
        self.directions = directions or random.Random(0)
        self.input_draws = inputs or random.Random(0)
        self.reverse = []  # per state: runs from t = T-1 down to 0
        self.awkward = rng.random() < 0.35
        self.names = Namer(rng, self.awkward)
        self.params = []  # dicts var, name, kind, shape
        self.products = set()
        self.allow_dup = rng.random() < 0.08
        self.dead_ok = rng.random() < 0.08  # named nodes that feed nothing
        self.body = []
        self.bare = False
        self.counts = collections.Counter()

    # -- parameters --------------------------------------------------------------
    def param(self, kind, shape):
        rng = self.rng
        same = [p for p in self.params if p["kind"] == kind and p["shape"] == list(shape)]
        if same and rng.random() < 0.15:  # a shared parameter
            return rng.choice(same)["var"]
        stem = {"matrix": "W", "bias": "b", "diagonal": "p", "gain": "g"}[kind]
        self.counts[stem] += 1
        var = f"{stem}{self.counts[stem] - 1}"
        self.params.append({"var": var, "name": self.names.pick(stem + "_"), "kind": kind,
                            "shape": list(shape)})
        return var

    def product(self, rows, source, cols):
        """W @ source with a (rows, cols) matrix, new or shared; the same product twice
        (refused by the API: 'name W_x is already defined') only in allow_dup cells."""
        for _ in range(5):
            var = self.param("matrix", (rows, cols))
            key = json.dumps([var, source])
            if key not in self.products or self.allow_dup:
                break
        self.products.add(key)
        return ["mm", var, source]

    def dup_ok(self, e):
        """Whether e may be written twice: never with an inline m.node (declared twice),
        with a product only in allow_dup cells."""
        return not _has(e, "named") and (self.allow_dup or not _has(e, "mm"))

    # -- vectors -----------------------------------------------------------------
    def vectors(self, size):
        return [v for v, s in self.available if s == size]

    def sizes_with_vectors(self):
        return sorted({s for _, s in self.available})

    def leaf(self, size):
        """A vector of the model of this size, or a product of one of another size."""
        rng = self.rng
        own = self.vectors(size)
        if own and rng.random() < 0.7:
            return rng.choice(own)
        src_size = rng.choice(self.sizes_with_vectors())
        return self.product(size, rng.choice(self.vectors(src_size)), src_size)

    def affine(self, size, include=None):
        """W1 @ v1 + ... + b: a pre-activation."""
        rng = self.rng
        terms = []
        if include is not None:
            terms.append(self.product(size, include[0], include[1]))
        for _ in range(rng.choice([1, 1, 2])):
            src_size = rng.choice(self.sizes_with_vectors())
            terms.append(self.product(size, rng.choice(self.vectors(src_size)), src_size))
        if rng.random() < 0.2 and self.vectors(size):
            terms.append(["mul", ["param", self.param("diagonal", (size,))],
                          rng.choice(self.vectors(size))])
        rng.shuffle(terms)
        if rng.random() < 0.8:
            terms.append(["param", self.param("bias", (size,))])
        e = terms[0]
        for t in terms[1:]:
            e = ["add", e, t]
        return e

    def bare_state(self, size):
        """In a cell that reads states at t as the State object, sometimes one (for the
        operators a State may lack: s ** 2)."""
        cur = [v for v in self.vectors(size) if v[0] == "cur"]
        if self.bare and cur and self.rng.random() < 0.5:
            return self.rng.choice(cur)
        return None

    def simple(self, size):
        return self.affine(size) if self.rng.random() < 0.5 else self.leaf(size)

    def gen(self, size, depth):
        rng = self.rng
        if depth <= 0:
            return self.simple(size)
        sub = lambda: self.gen(size, depth - 1)  # noqa: E731
        r = rng.random()
        if r < 0.24:
            return ["f", rng.choice(["tanh", "tanh", "sigmoid", "softplus"]), sub()]
        if r < 0.28:
            form = rng.randrange(3)  # only the chosen operand is generated
            inner = [["f", "tanh", None], ["neg", ["pow", None, "2"]],
                     ["cmul", "0.5", ["f", "sigmoid", None]]][form]
            if form == 1:
                inner[1][1] = sub()
            else:
                inner[2] = sub() if form == 0 else ["f", "sigmoid", sub()]
            return ["f", "exp", inner]
        if r < 0.33:
            return ["f", "log", self.pos(size, depth - 1)]
        if r < 0.37:
            if rng.random() < 0.3:
                return ["apply", "sqrt", self.pos(size, depth - 1)]
            if rng.random() < 0.4:  # the API's own sqrt
                return ["api", "sqrt", self.pos(size, depth - 1)]
            return ["mexpr", rng.choice(["hyp", "sqrtpos"]), self.pos(size, depth - 1)] \
                if rng.random() < 0.5 else ["mexpr", "hyp", sub()]
        if r < 0.40:
            return ["apply", rng.choice(["erf", "atan"]), sub()]
        if r < 0.47:  # kinks, rarely
            k = rng.random()
            if k < 0.35:
                return ["f", "relu", sub()]
            if k < 0.6:
                return ["apply", "Abs", sub()]
            if rng.random() < 0.5:  # the API's own max/min (from bpttgen import max)
                return ["api", rng.choice(["max", "min"]), sub(), sub()]
            return ["mexpr", rng.choice(["max", "min"]), sub(), sub()]
        if r < 0.57:
            return [rng.choice(["add", "sub"]), sub(), sub()]
        if r < 0.67:
            return ["mul", sub(), sub()]
        if r < 0.75:
            return ["div", sub(), self.pos(size, depth - 1)]
        if r < 0.80:
            key = rng.choice(["quot", "quot2", "lse", "gauss"])
            return ["mexpr", key] + [sub() for _ in range(MEXPR[key][1])]
        if r < 0.86:
            if rng.random() < 0.5:
                return ["pow", self.bare_state(size) or sub(), rng.choice(["2", "3"])]
            return ["pow", self.pos(size, depth - 1), rng.choice(POS_POWERS)]
        if r < 0.863:  # Python-level spellings a user may write: 2 ** v, abs(v)
            return ["cpow", "2", ["f", "tanh", sub()]] if rng.random() < 0.5 \
                else ["pyabs", sub()]
        if r < 0.92:
            op = rng.choice(["cadd", "csub", "cmul", "neg"])
            return ["neg", sub()] if op == "neg" else [op, rng.choice(CONSTS), sub()]
        if r < 0.95:
            return ["named", self.names.pick("n"), sub()]
        if r < 0.975:  # a reduction over the units of a vector (of any size), a scalar
            src_size = rng.choice(self.sizes_with_vectors())
            scalar = ["red", rng.choice(["sum", "mean"]), rng.choice(["tanh", "sigmoid"]),
                      self.gen(src_size, depth - 1)]
            return [rng.choice(["smul", "sadd"]), sub(), scalar]
        if r < 0.99:  # a normalisation over the units, eps large: kept well conditioned
            gain = ["param", self.param("gain", (size,))] if rng.random() < 0.5 else None
            return ["norm", rng.choice(["layernorm", "rmsnorm"]), sub(), gain]
        return self.simple(size)

    def pos(self, size, depth):
        """An expression >= 1/4 everywhere."""
        rng = self.rng
        e = self.gen(size, depth)
        form = rng.randrange(9)
        if form == 0:
            return ["cadd", "1", ["mul", e, e]] if self.dup_ok(e) \
                else ["cadd", "1", ["pow", e, "2"]]
        if form == 1:
            return ["cadd", "1", ["pow", self.bare_state(size) or e, "2"]]
        if form == 2:
            return ["cadd", "2", ["f", "tanh", e]]
        if form == 3:
            return ["cadd", "0.5", ["f", "softplus", e]]
        if form == 4:
            return ["f", "exp", ["f", "tanh", e]]
        if form == 5:
            return ["cadd", "0.25", ["f", "sigmoid", e]]
        if form == 6:
            return ["mexpr", "hyp", e]
        if form == 7:
            return ["cadd", "1", ["apply", "Abs", e]]  # a kink
        return ["cadd", "1", ["pow", ["mexpr", "max", e, self.simple(size)], "2"]]  # a kink

    # -- the cell ----------------------------------------------------------------
    def cell(self):
        rng, names = self.rng, self.names
        awk = self.awkward

        def size_name(plain):
            if awk and rng.random() < 0.2:
                for _ in range(3):
                    c = rng.choice(ODD_SIZES if rng.random() < 0.6 else AWKWARD_SIZES)
                    if names.take(c):
                        return c
            if not awk and rng.random() < 0.3:  # plain, but not the usual letter
                plain = rng.choice(PLAIN_SIZES.get(plain, [plain]))
            return plain if names.take(plain) else names.plain(plain)

        n_states = rng.choices([1, 2, 3], [0.5, 0.35, 0.15])[0]
        n_state_sizes = 2 if n_states > 1 and rng.random() < 0.4 else 1
        state_sizes = [size_name("H")] + ([size_name("G")] if n_state_sizes == 2 else [])
        input_size = state_sizes[0] if rng.random() < 0.15 else size_name("I")
        output_size = rng.choice(state_sizes) if rng.random() < 0.2 else size_name("O")
        sizes = list(dict.fromkeys([input_size] + state_sizes + [output_size]))
        if rng.random() < 0.03:  # a size nothing uses
            sizes.append(size_name("E"))
        if rng.random() < 0.3:
            rng.shuffle(sizes)
        model_name = rng.choice(AWKWARD_MODELS) if awk and rng.random() < 0.3 else "cell"

        states = []
        for k in range(n_states):
            size = state_sizes[k] if k < len(state_sizes) else rng.choice(state_sizes)
            states.append({"name": names.pick("s", plain_first=["h", "c", "q"][k]),
                           "size": size})
        self.reverse = self.draw_reverse(n_states)
        for k, rev in enumerate(self.reverse):
            if rev:
                states[k]["reverse"] = True
        input_name = names.pick("x", plain_first=rng.choice(["x", "x", "x", "u", "inp", "xt"]))
        inputs = [{"name": input_name, "size": input_size}] + \
            self.draw_inputs(state_sizes, input_size, sizes)
        bare = self.bare = rng.random() < 0.2

        self.available = [(["in", j], inp["size"]) for j, inp in enumerate(inputs)] + \
            [(["prev", k], s["size"]) for k, s in enumerate(states)]
        body = self.body
        order = list(range(n_states))
        if rng.random() < 0.3:
            rng.shuffle(order)
        for k in order:
            size = states[k]["size"]
            # A state's update, and the nodes drawn for it, read only vectors of its own
            # direction (or of none: the inputs and what reads only inputs).
            everything = self.available
            if any(self.reverse):
                self.available = [(v, sz) for v, sz in everything
                                  if self.direction(v) <= {self.reverse[k]}]
            first_new = len(self.available)
            for _ in range(rng.choice([0, 0, 1, 1, 2])):
                nsize = rng.choice(self.sizes_with_vectors() + [size])
                var = f"n{sum(1 for s in body if s['op'] == 'node')}"
                body.append({"op": "node", "var": var, "name": names.pick("n"),
                             "expr": self.gen(nsize, rng.choice([1, 1, 2]))})
                self.available.append((["node", var], nsize))
            body.append({"op": "update", "state": k, "expr": self.update_expr(k, size)})
            self.available.append((["cur", k], size))
            if self.available is not everything:
                everything.extend(self.available[first_new:])
                self.available = everything
        if rng.random() < 0.9:  # readout nodes read no previous state (refused today)
            self.available = [(v, sz) for v, sz in self.available if v[0] != "prev"]
        for _ in range(rng.choice([0, 0, 1, 2])):  # post nodes, after every update
            nsize = rng.choice(self.sizes_with_vectors())
            var = f"n{sum(1 for s in body if s['op'] == 'node')}"
            body.append({"op": "node", "var": var, "name": names.pick("n"),
                         "expr": self.gen(nsize, rng.choice([0, 1, 2]))})
            self.available.append((["node", var], nsize))

        output = self.output_expr(states, output_size, body)
        if not self.dead_ok:  # every named node feeds something (dead nodes are refused)
            for j, st in enumerate(body):
                if st["op"] == "node" and not self.referenced(st["var"], body, output):
                    size = self.node_size(st["var"])
                    later = [u for u in body[j + 1:] if u["op"] == "update" and
                             self.direction(["node", st["var"]]) <= {self.reverse[u["state"]]}]
                    if later:  # into the next update: a node of the recurrence
                        u = later[0]
                        u["expr"] = ["add", u["expr"], self.product(
                            states[u["state"]]["size"], ["node", st["var"]], size)]
                    else:
                        output = ["add", output, self.product(output_size, ["node", st["var"]],
                                                              size)]
        for j, inp in enumerate(inputs if len(inputs) > 1 else ()):  # every input is read
            if not _contains(output, ["in", j]) and \
                    not any(_contains(st["expr"], ["in", j]) for st in body):
                output = self.read_input(j, inp["size"], states, output, output_size)
        loss = self.loss()
        return {"model": model_name, "sizes": sizes, "input": inputs,
                "states": states, "params": self.params, "body": body,
                "output": {"expr": output, "at": "last" if rng.random() < 0.3 else "every"},
                "loss": loss, "bare": bare}

    def draw_inputs(self, state_sizes, first_size, sizes):
        """The inputs after the first (most cells none, a quarter one, a few two): each
        of a state's size, of the first input's or of a size of its own (added to
        sizes)."""
        d = self.input_draws
        n = min(MAX_INPUTS, d.choices([1, 2, 3], [0.7, 0.25, 0.05])[0])
        names, saved = self.names, self.names.rng
        names.rng = d  # (an awkward cell's awkward names, from this generator)
        try:
            out = []
            for _ in range(n - 1):
                r = d.random()
                if r < 0.35:
                    size = d.choice(state_sizes)
                elif r < 0.5:
                    size = first_size
                else:
                    candidates = EXTRA_INPUT_SIZES + (ODD_SIZES if self.awkward else [])
                    size = next((c for c in d.sample(candidates, 4) if names.take(c)), None) \
                        or names.plain("I")
                    sizes.append(size)
                out.append({"name": names.pick("x", plain_first=d.choice(EXTRA_INPUT_NAMES)),
                            "size": size})
            return out
        finally:
            names.rng = saved

    def read_input(self, j, size, states, output, output_size):
        """Make an input nothing read yet read: a term of an update (a product, or the
        input itself or times a diagonal where the sizes agree) or of the readout."""
        rng = self.rng
        updates = [st for st in self.body if st["op"] == "update"]
        u = rng.choice(updates) if rng.random() < 0.7 else None
        target = states[u["state"]]["size"] if u else output_size
        if target == size and rng.random() < 0.6:
            term = ["in", j] if rng.random() < 0.5 else \
                ["mul", ["param", self.param("diagonal", (size,))], ["in", j]]
        else:
            term = self.product(target, ["in", j], size)
        if u is None:
            return ["add", output, term]
        u["expr"] = ["add", u["expr"], term]
        return output

    def draw_reverse(self, n_states):
        """Which states run in reverse: in ~15% of the cells with two or three states
        some of them (now and then all), in a few one-state cells the one."""
        d = self.directions
        if n_states == 1:
            return [d.random() < 0.04]
        if d.random() >= 0.15:
            return [False] * n_states
        if d.random() < 0.15:
            return [True] * n_states
        flags = [False] * n_states
        for k in d.sample(range(n_states), d.randint(1, n_states - 1)):
            flags[k] = True
        return flags

    def direction(self, v):
        """The directions (False forward, True reverse) of the states a vector reads."""
        if v[0] in ("prev", "cur"):
            return {self.reverse[v[1]]}
        if v[0] == "node":
            st = next(st for st in self.body if st["op"] == "node" and st["var"] == v[1])
            return _expr_directions(st["expr"], self.reverse, self.body)
        return set()

    def node_size(self, var):
        return next(s for v, s in self.available if v == ["node", var])

    @staticmethod
    def referenced(var, body, output):
        ref = ["node", var]
        return any(_contains(st["expr"], ref) for st in body) or _contains(output, ref)

    def update_expr(self, k, size):
        rng = self.rng
        prev = (["prev", k], size)
        form = rng.random()
        if form < 0.35:
            return ["f", rng.choice(["tanh", "tanh", "sigmoid", "softplus"]),
                    self.affine(size, include=prev)]
        if form < 0.55:  # gated mix (1 - g) * s_prev + g * n
            g = ["f", "sigmoid", self.affine(size, include=prev if rng.random() < 0.5 else None)]
            cand = ["f", "tanh", self.affine(size, include=prev)]
            if rng.random() < 0.3:  # an inline m.node gate, read once
                g = ["named", self.names.pick("g"), g]
                return ["add", ["prev", k], ["mul", g, ["sub", cand, ["prev", k]]]]
            if not self.dup_ok(g):  # the gate as a named node of the body, read twice
                var = f"n{sum(1 for st in self.body if st['op'] == 'node')}"
                self.body.append({"op": "node", "var": var, "name": self.names.pick("g"),
                                  "expr": g})
                self.available.append((["node", var], size))
                g = ["node", var]
            return ["add", ["mul", ["csub", "1", g], ["prev", k]], ["mul", g, cand]]
        if form < 0.65:  # residual
            return ["add", ["prev", k], ["cmul", "0.5", ["f", "tanh", self.affine(size, prev)]]]
        e = self.gen(size, rng.choice([1, 2, 2, 3]))
        if rng.random() < 0.5:
            e = ["add", e, self.product(size, ["prev", k], size)]
        return e

    def output_expr(self, states, output_size, body):
        rng = self.rng
        same = [k for k, s in enumerate(states) if s["size"] == output_size]
        if same and rng.random() < 0.15 and len(set(self.reverse)) == 1:
            k = rng.choice(same)
            return ["cur", k] if rng.random() < 0.5 else ["f", "tanh", ["cur", k]]
        last_update = max(k for k, st in enumerate(body) if st["op"] == "update")
        post = [st["var"] for k, st in enumerate(body) if st["op"] == "node" and (
            k > last_update or not _has(st["expr"], "prev") or rng.random() < 0.1)]
        # (a node read only by the readout that reads a previous state is refused today)
        terms = []
        for k, s in enumerate(states):
            if rng.random() < 0.85 or not terms and k == len(states) - 1:
                src = ["cur", k]
                if rng.random() < 0.2:
                    src = ["f", rng.choice(["softplus", "tanh"]), src]
                terms.append(self.product(output_size, src, s["size"]))
        for rev in sorted(set(self.reverse)):  # a bidirectional readout reads both
            if len(set(self.reverse)) > 1 and not any(
                    t[2] == ["cur", k] or t[2][2:] == [["cur", k]] for t in terms
                    for k in range(len(states)) if self.reverse[k] == rev):
                k = rng.choice([k for k in range(len(states)) if self.reverse[k] == rev])
                terms.append(self.product(output_size, ["cur", k], states[k]["size"]))
        if post and rng.random() < 0.3:
            var = rng.choice(post)
            size = next(s for v, s in self.available if v == ["node", var])
            terms.append(self.product(output_size, ["node", var], size))
        if not terms:
            terms.append(self.product(output_size, ["cur", len(states) - 1],
                                      states[-1]["size"]))
        if rng.random() < 0.8:
            terms.append(["param", self.param("bias", (output_size,))])
        e = terms[0]
        for t in terms[1:]:
            e = ["add", e, t]
        return e

    def loss(self):
        rng = self.rng
        if rng.random() < 0.55:
            return {"kind": "builtin", "name": rng.choice(BUILTIN_LOSSES),
                    "as_string": rng.random() < 0.2}
        template = rng.randrange(len(CUSTOM_LOSSES))
        n_sums = len(CUSTOM_LOSSES[template][1])
        sums = []
        for k in range(n_sums):
            name = None
            if self.awkward and rng.random() < 0.3:
                c = rng.choice(AWKWARD_SUMS)
                if c not in sums:
                    name = c
            sums.append(name or ["S", "D"][k])
        name = rng.choice(AWKWARD_LOSS_NAMES) if self.awkward and rng.random() < 0.3 \
            else "fuzz_loss"
        return {"kind": "custom", "template": template, "name": name, "sums": sums}


def _expr_directions(e, reverse, body):
    """The directions of the states expression e reads, through the body's nodes."""
    if e[0] in ("prev", "cur"):
        return {reverse[e[1]]}
    if e[0] == "node":
        st = next(st for st in body if st["op"] == "node" and st["var"] == e[1])
        return _expr_directions(st["expr"], reverse, body)
    if e[0] in ("in", "param"):
        return set()
    return set().union(*[_expr_directions(e[i], reverse, body) for i in _children(e)])


def _contains(e, sub):
    return e == sub or (isinstance(e, list) and any(_contains(c, sub) for c in e[1:]))


def _has(e, op):
    return isinstance(e, list) and (e[:1] == [op] or any(_has(c, op) for c in e[1:]))


def generate_spec(seed, index):
    """Cell ``index`` of run ``seed``: a pure function of the two."""
    spec = Generator(random.Random(f"bpttgen-fuzz:{seed}:{index}"),
                     random.Random(f"bpttgen-fuzz-reverse:{seed}:{index}"),
                     random.Random(f"bpttgen-fuzz-inputs:{seed}:{index}")).cell()
    # Some cells read their input as integer tokens through an embedding table of shape
    # (size, size), whose column v_in = E[x] stands where the input vector stood. Drawn
    # from a generator of its own, so that the cells of a seed are otherwise unchanged;
    # only where the cell reads its input (an unread table would be refused as unused).
    tokens = random.Random(f"bpttgen-fuzz-tokens:{seed}:{index}")
    # A token input stays the only input of its model.
    if tokens.random() < 0.2 and len(spec["input"]) == 1 and _reads_input(spec, 0):
        taken, name = _all_names(spec), "emb"
        while name in taken:
            name += "_"
        spec["input"][0]["table"] = name
    return spec


def _reads_input(spec, j):
    return any(_contains(st["expr"], ["in", j]) for st in spec["body"]) or \
        _contains(spec["output"]["expr"], ["in", j])


# -- printing a spec as a definition file ---------------------------------------------

ATOM, POW, NEG, MUL, ADD = 100, 16, 15, 14, 13


class Printer:
    def __init__(self, spec):
        self.spec = spec
        self.state_vars = [f"s{k}" for k in range(len(spec["states"]))]

    def wrap(self, e, limit):
        src, prec = self.pr(e)
        return f"({src})" if prec < limit else src

    def pr(self, e):
        op = e[0]
        if op == "in":
            return _input_var(e[1]), ATOM
        if op == "prev":
            return f"{self.state_vars[e[1]]}.prev", ATOM
        if op == "cur":
            return (self.state_vars[e[1]] if self.spec.get("bare")
                    else f"{self.state_vars[e[1]]}.t"), ATOM
        if op in ("node", "param"):
            return e[1], ATOM
        if op == "mm":
            return f"{e[1]} @ {self.wrap(e[2], MUL + 1)}", MUL
        if op == "f":
            return f"{e[1]}({self.pr(e[2])[0]})", ATOM
        if op == "apply":
            return f"{self.wrap(e[2], ATOM)}.apply({APPLY[e[1]]})", ATOM
        if op == "mexpr":
            template, arity = MEXPR[e[1]]
            args = ", ".join(f"{k}={self.pr(x)[0]}" for k, x in zip("ab", e[2:2 + arity]))
            return f"m.expr({template}, {args})", ATOM
        if op in ("add", "sub"):
            sym = "+" if op == "add" else "-"
            return f"{self.wrap(e[1], ADD)} {sym} {self.wrap(e[2], ADD + 1)}", ADD
        if op in ("mul", "div"):
            sym = "*" if op == "mul" else "/"
            return f"{self.wrap(e[1], MUL)} {sym} {self.wrap(e[2], MUL + 1)}", MUL
        if op == "pow":
            return f"{self.wrap(e[1], POW + 1)} ** {e[2]}", POW
        if op == "neg":
            return f"-{self.wrap(e[1], NEG)}", NEG
        if op == "cadd":
            return f"{e[1]} + {self.wrap(e[2], ADD + 1)}", ADD
        if op == "csub":
            return f"{e[1]} - {self.wrap(e[2], ADD + 1)}", ADD
        if op == "cmul":
            return f"{e[1]} * {self.wrap(e[2], MUL + 1)}", MUL
        if op == "named":
            return f"m.node({e[1]!r}, {self.pr(e[2])[0]})", ATOM
        if op == "cpow":
            return f"{e[1]} ** {self.wrap(e[2], POW)}", POW
        if op == "api":
            return f"{e[1]}({', '.join(self.pr(x)[0] for x in e[2:])})", ATOM
        if op == "pyabs":
            return f"abs({self.pr(e[1])[0]})", ATOM
        if op == "red":  # a Scalar: f(m.sum(v)) or f(m.mean(v))
            return f"{e[2]}(m.{e[1]}({self.pr(e[3])[0]}))", ATOM
        if op in ("smul", "sadd"):
            sym = "*" if op == "smul" else "+"
            return f"{self.wrap(e[1], MUL if op == 'smul' else ADD)} {sym} {self.pr(e[2])[0]}", \
                MUL if op == "smul" else ADD
        if op == "norm":
            gain = f", gain={self.pr(e[3])[0]}" if e[3] else ""
            return f"m.{e[1]}({self.pr(e[2])[0]}{gain}, eps=0.5)", ATOM
        raise ValueError(f"unknown expression {e!r}")


def _input_var(j):
    return "v_in" if j == 0 else f"v_in{j + 1}"


def cell_source(spec, header=None):
    """The definition file of a spec: what is tested, and what a failure prints."""
    p = Printer(spec)
    body = []
    body.append(f"m = Model({spec['model']!r}, sizes={tuple(spec['sizes'])!r})")
    for j, inp in enumerate(spec["input"]):
        if inp.get("table"):  # tokens, looked up in a (size, size) table: v_in = E[x]
            body.append(f"t_in = m.tokens({inp['name']!r}, vocab={inp['size']!r})")
            body.append(f"v_in = m.embedding({inp['table']!r}, {inp['size']!r}, "
                        f"{inp['size']!r})[t_in]")
        else:
            body.append(f"{_input_var(j)} = m.input({inp['name']!r}, {inp['size']!r})")
    for k, s in enumerate(spec["states"]):
        rev = ", reverse=True" if s.get("reverse") else ""
        body.append(f"{p.state_vars[k]} = m.state({s['name']!r}, {s['size']!r}{rev})")
    for q in spec["params"]:
        shape = ", ".join(repr(s) for s in q["shape"])
        body.append(f"{q['var']} = m.{q['kind']}({q['name']!r}, {shape})")
    for st in spec["body"]:
        if st["op"] == "node":
            body.append(f"{st['var']} = m.node({st['name']!r}, {p.pr(st['expr'])[0]})")
        else:
            body.append(f"m.update({p.state_vars[st['state']]}, {p.pr(st['expr'])[0]})")
    loss = spec["loss"]
    top = []
    if loss["kind"] == "builtin":
        loss_src = repr({"softmax_cross_entropy": "softmax_ce"}.get(loss["name"], loss["name"])) \
            if loss.get("as_string") else loss["name"]
    else:
        value, sums, target, prediction = CUSTOM_LOSSES[loss["template"]]
        slots = [f"R{k + 1}" for k in range(len(sums))]
        top.append(", ".join(slots) + " = " + ", ".join(
            f"sympy.Symbol({n!r}, real=True)" for n in loss["sums"]))
        kwargs = {name: sums[f"R{k + 1}"] for k, name in enumerate(loss["sums"])}
        plain = all(n.isidentifier() and not keyword.iskeyword(n) and n not in (
            "name", "value", "target", "prediction", "description") for n in kwargs)
        args = [repr(loss["name"]), value, f"target={target!r}"]
        if prediction:
            args.append(f"prediction={prediction}")
        if plain:
            args += [f"{n}={s}" for n, s in kwargs.items()]
        else:
            args.append("**{" + ", ".join(f"{n!r}: {s}" for n, s in kwargs.items()) + "}")
        top.append(f"LOSS = custom_loss({', '.join(args)})")
        loss_src = "LOSS"
    at = spec["output"]["at"]
    body.append(f"m.output({p.pr(spec['output']['expr'])[0]}, loss={loss_src}"
                + (f", at={at!r})" if at != "every" else ")"))
    body.append("return m")
    text = "\n".join(["    " + line for line in body])
    used = sorted(n for n in ("custom_loss", "exp", "log", "max", "min", "mse", "relu",
                              "sigmoid", "sigmoid_bce", "softmax_cross_entropy", "softplus",
                              "sqrt", "sse", "tanh")
                  if re.search(rf"(?<![.\w'\"]){n}\b", text + "\n".join(top)))
    imports = ["import sympy", "", "from bpttgen import " + ", ".join(["Model"] + used)]
    loss_symbols = [n for n in ("K", "d", "shift", "z")
                    if re.search(rf"(?<![.\w'\"]){n}\b", "\n".join(top))]
    if loss_symbols:
        imports.append("from bpttgen.derive.losses import " + ", ".join(
            "m as shift" if n == "shift" else n for n in loss_symbols))
    if "m.expr(" in text:
        top.insert(0, 'a, b = sympy.symbols("a b", real=True)')
    doc = f'"""{header}"""\n\n' if header else ""
    return (doc + "\n".join(imports) + "\n\n" + "".join(line + "\n" for line in top)
            + "\n\ndef model():\n" + text.rstrip() + "\n")


# ------------------------------------------------------------------------------------
# Running a cell (in a worker process)
# ------------------------------------------------------------------------------------

def _engine_frame(tb):
    """The innermost frame of a traceback in derive/, codegen/ or templates/, or None."""
    frames = traceback.extract_tb(tb)
    for frame in reversed(frames):
        rel = os.path.relpath(os.path.abspath(frame.filename), ROOT)
        if rel.split(os.sep)[0] in ("derive", "codegen", "templates", "bpttgen"):
            return f"{rel}:{frame.lineno} {frame.name}"
    return None


def _raised_in_engine(exc):
    """Whether the innermost frame of exc is in derive/ or codegen/ (a raise there)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    rel = os.path.relpath(os.path.abspath(frames[-1].filename), ROOT)
    return rel.split(os.sep)[0] in ("derive", "codegen", "bpttgen")


def _short(exc):
    return f"{type(exc).__name__}: {exc}"


class CellFailure(Exception):
    def __init__(self, cls, message, detail=None, key=None):
        super().__init__(message)
        self.cls, self.message, self.detail, self.key = cls, message, detail, key


def _is_numba_error(exc):
    try:
        from numba.core.errors import NumbaError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, NumbaError)


# -- the independent reference: the Model's nodes through lambdify -------------------

def _np_functions():
    import numpy as np

    def sigmoid(v):
        v = np.asarray(v, dtype=np.float64)
        return np.where(v >= 0, 1 / (1 + np.exp(-np.abs(v))),
                        np.exp(-np.abs(v)) / (1 + np.exp(-np.abs(v))))

    def maximum(*a):
        out = a[0]
        for b in a[1:]:
            out = np.maximum(out, b)
        return out

    def minimum(*a):
        out = a[0]
        for b in a[1:]:
            out = np.minimum(out, b)
        return out

    return {"sigmoid": sigmoid, "softplus": lambda v: np.logaddexp(0.0, v),
            "relu": lambda v: np.maximum(v, 0.0),
            "step": lambda v: (np.asarray(v) > 0).astype(np.float64),
            "Max": maximum, "Min": minimum}


_LAMBDIFIED = {}


def _lambdify(expr, names):
    import sympy as sp

    key = (expr, names)
    if key not in _LAMBDIFIED:
        if len(_LAMBDIFIED) > 5000:
            _LAMBDIFIED.clear()
        import scipy.special  # noqa: F401  (lambdify's erf)

        _LAMBDIFIED[key] = sp.lambdify([sp.Symbol(n, real=True) for n in names], expr,
                                       modules=[_np_functions(), "scipy", "numpy"],
                                       dummify=True)
    return _LAMBDIFIED[key]


def _eval(expr, env):
    names = tuple(sorted(s.name for s in expr.free_symbols))
    return _lambdify(expr, names)(*(env[n] for n in names))


def _kink_arguments(expr):
    """Expressions whose zeros are kinks of expr (relu, step, Abs, sign, Max, Min)."""
    import sympy as sp

    from bpttgen.derive import functions

    out = []
    for f in expr.atoms(sp.Function, sp.Abs, sp.Max, sp.Min, sp.sign, sp.Heaviside):
        if isinstance(f, (sp.Max, sp.Min)):
            args = list(f.args)
            out += [args[i] - args[j] for i in range(len(args)) for j in range(i + 1, len(args))]
        elif isinstance(f, (sp.Abs, sp.sign, sp.Heaviside)) or \
                type(f) in (functions.relu, functions.step):
            out.append(f.args[0])
    return out


def reference_run(model, params, x, widths, targets, state0, mask, l2):
    """Forward, predictions, per-step loss of the Model object, without derive().

    x is what a call gets: the inputs side by side, ``widths`` columns each in their
    order of declaration (or the tokens, of the model's only input).

    A reverse state runs from t = T-1 down to 0: its previous value at step t is its
    value at t+1 (state0 at t = T) and its final value the one at t = 0. Its trajectory
    comes first, from a pass with t descending that evaluates only the nodes whose
    arguments it has (those of the reverse direction, or of none); the pass with t
    ascending then evaluates every node, the forward states' previous values its own.

    Returns dict: y (T, B, O), final {state: (B, n)}, loss, kink (closest distance of a
    kink argument to its kink, inf if none), biggest (max |value| of any vector)."""
    import numpy as np
    import sympy as sp

    from bpttgen.derive.losses import K, d, m as shift, z

    T, B = x.shape[:2]
    if model.tokens_input:
        xs = {model.tokens_input: x}
    else:
        ends = np.cumsum(widths)
        xs = {name: x[:, :, end - width:end] for name, width, end in zip(model.inputs, widths,
                                                                           ends)}
    sizes = {} if model.tokens_input else {model.inputs[n]: xs[n].shape[2] for n in xs}
    for p in model.params.values():
        for s, n in zip(p.shape, params[p.name].shape):
            sizes[s] = n
    for name, st in model.states.items():
        sizes[st.size] = np.shape(state0[name])[1]
    prev_of = {name: st.prev.expr.name for name, st in model.states.items()}
    start = {name: np.asarray(state0[name], np.float64) for name in model.states}
    reverse = [name for name, st in model.states.items() if st.reverse]
    vec_params = {n: params[n] for n, p in model.params.items() if p.kind == "vector"}
    kinks = {n.name: _kink_arguments(n.expr) for n in model.nodes if n.kind != "linear"}
    reads = {n.name: [] if n.kind == "linear" and n.lookup else [n.source]
             if n.kind == "linear" else [s.name for s in n.expr.free_symbols]
             for n in model.nodes}
    loss = model.loss
    loss_kinks = [k for _, s in loss.sums for k in _kink_arguments(s)] + \
        _kink_arguments(loss.value)
    w = np.asarray(mask, np.float64).copy()
    if model.loss_at == "last":
        w[:-1] = 0
    far = {"kink": np.inf, "biggest": 0.0}

    def step(t, prevs, partial):
        """The nodes at step t; partial: only those whose arguments are known."""
        env = {**{n: v[t] for n, v in xs.items()}, **prevs, **vec_params,
               **sizes}  # a size: a mean's divisor
        for n in model.nodes:
            if partial and any(r not in env for r in reads[n.name]):
                continue
            if n.kind == "linear" and n.lookup:  # E[x]: column x_t of the table
                env[n.name] = np.asarray(params[n.weight])[:, np.asarray(env[n.source])].T
            elif n.kind == "linear":
                env[n.name] = env[n.source] @ params[n.weight].T
            elif n.kind == "reduction":  # the summand over the units, one number per row
                value = np.broadcast_to(_eval(n.expr, env), (B, sizes[n.over]))
                env[n.name] = np.sum(value, axis=1, keepdims=True)
            else:
                value = np.broadcast_to(_eval(n.expr, env), (B, sizes[n.size]))
                env[n.name] = np.array(value, dtype=np.float64)
                if partial:  # (measured by the full pass)
                    continue
                for a in kinks[n.name]:
                    far["kink"] = min(far["kink"], float(np.min(np.abs(_eval(a, env)))))
            far["biggest"] = max(far["biggest"], float(np.max(np.abs(env[n.name]))))
        return env

    # the reverse states, from the last step down
    later = {T: {s: start[s] for s in reverse}}  # t: the reverse states at t
    for t in reversed(range(T) if reverse else ()):
        env = step(t, {prev_of[s]: later[t + 1][s] for s in reverse}, partial=True)
        later[t] = {s: env[s] for s in reverse}
    current = {s: start[s] for s in model.states if s not in reverse}
    ys, total_loss = [], 0.0
    for t in range(T):
        env = step(t, {**{prev_of[s]: v for s, v in current.items()},
                       **{prev_of[s]: later[t + 1][s] for s in reverse}}, partial=False)
        current = {s: env[s] for s in current}
        zt = env[model.output_node]
        O = zt.shape[1]
        if loss.target == "index":
            dt = np.zeros_like(zt)
            dt[np.arange(B), np.asarray(targets[t], np.int64)] = 1.0
        else:
            dt = np.asarray(targets[t], np.float64)
        lenv = {z.name: zt, d.name: dt, shift.name: zt.max(axis=1, keepdims=True), K.name: O}
        for sym, summand in loss.sums:
            lenv[sym.name] = np.sum(np.broadcast_to(_eval(summand, lenv), zt.shape), axis=1,
                                    keepdims=True)
        for a in loss_kinks:
            far["kink"] = min(far["kink"], float(np.min(np.abs(_eval(a, lenv)))))
        value = np.broadcast_to(_eval(loss.value, lenv), (B, 1))[:, 0]
        total_loss += float(np.sum(w[t] * value))
        ys.append(np.array(np.broadcast_to(_eval(loss.prediction, lenv), zt.shape)))
    L = total_loss / w.sum()
    for n, p in model.params.items():
        if p.role == "weight":
            L += l2 / 2 * float(np.sum(params[n] ** 2))
    final = {name: current[name] if name in current else later[0][name]
             for name in model.states}
    del sp
    return {"y": np.stack(ys), "final": final, "loss": L, "kink": far["kink"],
            "biggest": far["biggest"]}


# -- comparisons ----------------------------------------------------------------------

def max_relative_error(a, b, floor=1e-3):
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return 0.0 if np.array_equal(a, b, equal_nan=True) else float("inf")
    denom = np.maximum(np.maximum(np.abs(a), np.abs(b)), floor)
    return float(np.max(np.abs(a - b) / denom))


def _problem(model, seed, scale):
    """params, x, widths, targets, state0, mask, T for the model's names (not the
    module's); x holds the inputs side by side, widths their columns."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dims = {s: 2 + (k % 2) for k, s in enumerate(model.sizes)}
    T, B = int(rng.integers(3, 5)), 2
    params = {n: rng.normal(0, scale, [dims[s] for s in p.shape])
              for n, p in model.params.items()}
    widths = [dims[size] for size in model.inputs.values()]
    if model.tokens_input:  # integer tokens: what finite differences never move
        x = rng.integers(0, widths[0], (T, B))
    else:
        x = rng.normal(0, 1, (T, B, sum(widths)))
    O = dims[model.size_of(model.output_node)]
    if model.loss.target == "index":
        targets = rng.integers(0, O, (T, B))
    else:
        targets = rng.uniform(0, 1, (T, B, O))
    state0 = {n: rng.normal(0, 0.5, (B, dims[st.size])) for n, st in model.states.items()}
    mask = rng.uniform(0.5, 1.5, (T, B))
    if model.loss_at == "every":
        mask[1, 0] = 0.0
    return params, x, widths, targets, state0, mask, T


def _call(label, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        cls = "numba-typing" if _is_numba_error(exc) else "other"
        key = f"{label.split('(')[0]} {type(exc).__name__}"
        if not str(exc).isascii():  # e.g. a name Python NFKC-normalises (µ, ℌ)
            key += " (non-ASCII name)"
        if cls == "numba-typing":  # the inner error, e.g. "NameError: name '_t' ..."
            inner = re.findall(r"^(\w+Error|No implementation of function|Unknown attribute)"
                               r"\b", str(exc), re.M)
            inner = [x for x in inner if x not in ("TypingError", "LoweringError")]
            if inner:
                key += f" ({inner[0]})"
        raise CellFailure(cls, f"{label}: {_short(exc)}"[:2000],
                          traceback.format_exc()[-6000:], key) from None


def check_module(module, model, seed):
    """The three checks of a cell; raises CellFailure; returns notes."""
    import numpy as np

    notes = []
    # data: far from kinks and well conditioned (retries with new seeds / smaller scale)
    for attempt in range(6):
        scale = 0.3 if attempt < 3 else 0.15
        params, x, widths, targets, state0, mask, T = _problem(model, seed + 7919 * attempt,
                                                               scale)
        try:
            ref = reference_run(model, params, x, widths, targets, state0, mask, 0.05)
        except Exception as exc:  # noqa: BLE001
            raise CellFailure("other", f"the fuzzer's reference failed: {_short(exc)}",
                              traceback.format_exc()[-6000:]) from None
        good = np.isfinite(ref["loss"]) and ref["biggest"] < 1e3
        if good and ref["kink"] >= KINK_MARGIN:
            break
    fd_ok = bool(good and ref["kink"] >= KINK_MARGIN)
    if not good:
        notes.append(f"ill-conditioned (max |value| {ref['biggest']:.3g}): FD skipped")
    elif not fd_ok:
        notes.append(f"kink within {ref['kink']:.1e} in every draw: FD skipped")
    kw = dict(state0=state0, mask=mask, l2=0.05)

    # (c) forward and the loss value against the reference
    y, final = _call("forward", module.forward, params, x, state0)
    err = max_relative_error(y, ref["y"])
    if err > AGREE_TOL:
        raise CellFailure("wrong-forward", f"forward() predictions differ from the "
                          f"reference by {err:.2e}")
    for name in model.states:
        err = max_relative_error(final[name], ref["final"][name])
        if err > AGREE_TOL:
            raise CellFailure("wrong-forward", f"forward() final state {name!r} differs "
                              f"from the reference by {err:.2e}")
    if len(widths) > 1:  # the inputs as a dict {name: (T, B, I_k)}: the same numbers
        parts = dict(zip(model.inputs, np.split(x, np.cumsum(widths)[:-1], axis=2)))
        y2, _ = _call("forward (inputs as a dict)", module.forward, params, parts, state0)
        if not np.array_equal(y2, y):
            raise CellFailure("wrong-forward", "forward() of the inputs as a dict differs "
                              f"from forward() of x by {max_relative_error(y2, y):.2e}")

    # (b) every algorithm, against bptt
    algorithms = list(module.ALGORITHMS)
    extras = {"tbptt": dict(k1=T, k2=T), "artbp": dict(c=0.0, seed=0),
              "checkpoint": dict(segment=2, snapshots=1)}
    reverse = [name for name, st in model.states.items() if st.reverse]
    for alg in FORWARD_ONLY if reverse else ():  # what cannot run a reverse state
        if alg in algorithms:
            raise CellFailure("other", f"ALGORITHMS offers {alg} for reverse state(s) "
                              f"{reverse}", key=f"{alg} offered")
        try:
            module.loss_and_grads(params, x, targets, algorithm=alg, **kw,
                                  **extras.get(alg, {}))
        except ValueError as exc:
            if "reverse" not in str(exc):
                raise CellFailure("other", f"{alg} refused without naming the reverse "
                                  f"state: {_short(exc)}", key=f"{alg} refusal") from None
        except Exception as exc:  # noqa: BLE001
            raise CellFailure("other", f"{alg} for reverse state(s) {reverse}: "
                              f"{_short(exc)}", traceback.format_exc()[-6000:],
                              key=f"{alg} {type(exc).__name__}") from None
        else:
            raise CellFailure("other", f"{alg} ran a model with reverse state(s) {reverse}",
                              key=f"{alg} ran")
    results = {}
    for alg in algorithms:
        extra = extras.get(alg, {})
        results[alg] = _call(f"loss_and_grads(algorithm={alg!r})", module.loss_and_grads,
                             params, x, targets, algorithm=alg, **kw, **extra)
    base_loss, base = results.get("bptt") or next(iter(results.values()))
    err = abs(base_loss - ref["loss"]) / max(1.0, abs(ref["loss"]))
    if not err <= AGREE_TOL:
        raise CellFailure("wrong-forward", f"loss value {base_loss!r} differs from the "
                          f"reference {ref['loss']!r} (rel. {err:.2e})")
    # loss(): the forward and the loss phase alone, whole and (no reverse state) in
    # stretches of two steps, each from the last one's states (memory_limit)
    losses = {"loss()": _call("loss()", module.loss, params, x, targets, **kw)}
    if not reverse:
        from bpttgen.codegen.runtime.calls import check_call

        sizes = check_call(module.SPEC, params, x, targets)[0]
        two = module._MODEL._call_bytes(sizes, 2, x.shape[1],
                                        next(iter(params.values())).dtype.itemsize)
        losses["loss(memory_limit)"] = _call("loss(memory_limit)", module.loss, params, x,
                                             targets, memory_limit=two, **kw)
    for label, value in losses.items():
        err = abs(value - base_loss) / max(1.0, abs(base_loss))
        if not err <= AGREE_TOL:
            raise CellFailure("wrong-forward", f"{label} {value!r} differs from "
                              f"loss_and_grads' {base_loss!r} (rel. {err:.2e})")
    bad = []
    for alg, (loss, grads) in results.items():
        lerr = abs(loss - base_loss) / max(1.0, abs(base_loss))
        if not lerr <= AGREE_TOL:
            bad.append(f"{alg} loss differs by {lerr:.1e}")
        for name in params:
            if name not in grads:
                raise CellFailure("other", f"{alg}: no gradient for {name!r}")
            e = max_relative_error(grads[name], base[name])
            if not e <= AGREE_TOL:
                bad.append(f"{alg} d{name} differs from bptt by {e:.1e}")
    if bad:
        raise CellFailure("algorithms-disagree", "; ".join(bad[:6]),
                          key=" ".join(sorted({b.split()[0] for b in bad})))

    # (a) finite differences of the module's own loss
    if fd_ok:
        loss_fn = lambda p: module.loss_and_grads(p, x, targets, **kw)[0]  # noqa: E731
        wrong, wrong_algs = [], set()
        for name, value in params.items():
            for idx in np.ndindex(value.shape):
                orig = value[idx]

                def f(delta):
                    value[idx] = orig + delta
                    try:
                        return _call("loss_and_grads (finite differences)", loss_fn, params)
                    finally:
                        value[idx] = orig

                h = 1e-6
                fd = (f(h) - f(-h)) / (2 * h)
                worst = max(max_relative_error(r[1][name][idx], fd) for r in results.values())
                if worst <= FD_TOL:
                    continue
                h = 1e-4  # confirm with the five-point stencil
                fd5 = (-f(2 * h) + 8 * f(h) - 8 * f(-h) + f(-2 * h)) / (12 * h)
                # What the stencil cannot resolve: the loss's own rounding, amplified by
                # 1/h (a cell whose states grow to a loss of 1e5 leaves ~1e-8 of noise).
                noise = 16 * np.finfo(np.float64).eps * max(1.0, abs(f(0.0))) / h
                worst5 = {alg: 0.0 if abs(r[1][name][idx] - fd5) <= noise
                          else max_relative_error(r[1][name][idx], fd5)
                          for alg, r in results.items()}
                if max(worst5.values()) <= FD_TOL:
                    notes.append(f"FD noise at {name}{list(idx)} resolved by 5-point")
                    continue
                wrong_algs.update(a for a, e in worst5.items() if e > FD_TOL)
                wrong.append(f"d{name}{list(idx)}: bptt {base[name][idx]:.10g} vs FD "
                             f"{fd5:.10g} (rel. {worst5.get('bptt', max(worst5.values())):.1e};"
                             f" algorithms {sorted(a for a, e in worst5.items() if e > FD_TOL)})")
        if wrong:
            raise CellFailure("wrong-gradient", f"{len(wrong)} gradient element(s) differ "
                              f"from finite differences; first: " + "; ".join(wrong[:3]),
                              key="all algorithms" if len(wrong_algs) == len(results)
                              else " ".join(sorted(wrong_algs)))
    return notes


def build_model(source, path):
    with open(path, "w") as f:
        f.write(source)
    namespace = {"__name__": "fuzz_definition", "__file__": path}
    code = compile(source, path, "exec")
    exec(code, namespace)  # noqa: S102
    return namespace["model"]()


def _refusal(stage, exc):
    message = str(exc)
    location = getattr(exc, "location", None)
    if location and message.startswith(f"{location}: "):
        message = message[len(location) + 2:]
    return {"outcome": "refused", "stage": stage, "type": type(exc).__name__,
            "message": message[:1000],
            "signature": ["refused", stage, type(exc).__name__, _group_key(message)]}


def run_source(source, workdir, jit, seed=0):
    """Everything about one definition source: a result dict (JSON-able)."""
    from bpttgen.derive.losses import LossError
    from bpttgen.derive.model import DefinitionError

    times = {}
    t0 = time.perf_counter()
    result = {"outcome": "ok", "jit": jit, "notes": []}

    def fail(cls, message, tb=None, frame=None):
        result.update(outcome="fail", **{"class": cls}, message=message[:3000])
        if tb:
            result["traceback"] = tb[-8000:]
        result["signature"] = [cls] + ([frame] if frame else [])
        return result

    os.makedirs(workdir, exist_ok=True)
    try:
        t = time.perf_counter()
        try:
            model = build_model(source, os.path.join(workdir, "definition.py"))
        except (DefinitionError, LossError) as exc:
            return {**result, **_refusal("definition", exc)}
        except Exception as exc:  # noqa: BLE001
            return fail("definition-crash", _short(exc), traceback.format_exc(),
                        f"{type(exc).__name__}: {_numbers_blanked(str(exc))[:100]}")
        times["build"] = time.perf_counter() - t

        t = time.perf_counter()
        try:
            from bpttgen.codegen.generate import module_sources

            sources = module_sources(model, "bench/fuzz.py")
        except (DefinitionError, LossError) as exc:
            return {**result, **_refusal("derive", exc)}
        except ValueError as exc:
            if _raised_in_engine(exc):  # a deliberate refusal, not an internal error
                return {**result, **_refusal("derive", exc)}
            return fail("generate-crash", _short(exc), traceback.format_exc(),
                        f"{type(exc).__name__} at {_engine_frame(exc.__traceback__)}")
        except Exception as exc:  # noqa: BLE001
            return fail("generate-crash", _short(exc), traceback.format_exc(),
                        f"{type(exc).__name__} at {_engine_frame(exc.__traceback__)}")
        times["derive"] = time.perf_counter() - t

        t = time.perf_counter()
        (filename, text), = sources.items()
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        mdir = os.path.join(workdir, "module")
        os.makedirs(mdir, exist_ok=True)
        mpath = os.path.join(mdir, filename)
        if not (os.path.exists(mpath) and open(mpath).read() == text):
            with open(mpath, "w") as f:  # unchanged files keep Numba's cache valid
                f.write(text)
        modname = f"bpttgen_fuzz_{digest}"
        try:
            from bpttgen.codegen.generate import import_path

            module = import_path(mpath, modname)
        except Exception as exc:  # noqa: BLE001
            tb = traceback.format_exc()
            return fail("import-crash", _short(exc), tb, type(exc).__name__)
        times["import"] = time.perf_counter() - t

        t = time.perf_counter()
        try:
            result["notes"] += check_module(module, model, seed)
        except CellFailure as cf:
            return fail(cf.cls, cf.message, cf.detail, cf.key)
        finally:
            times["check"] = time.perf_counter() - t
            sys.modules.pop(modname, None)
        return result
    finally:
        times["total"] = time.perf_counter() - t0
        result["times"] = times


# -- worker process ---------------------------------------------------------------------

def worker_main():
    """Read JSON jobs from stdin, write one JSON result line each to the real stdout."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed goes to stderr
    sys.stdout = sys.stderr
    jit = os.environ.get("NUMBA_DISABLE_JIT", "0") != "1"
    t = time.perf_counter()
    import numpy  # noqa: F401
    import sympy  # noqa: F401

    import bpttgen.codegen.generate  # noqa: F401
    import bpttgen.codegen.runtime  # noqa: F401
    import bpttgen.derive  # noqa: F401
    import numba  # noqa: F401

    proto.write(json.dumps({"ready": True, "startup": time.perf_counter() - t}) + "\n")
    proto.flush()
    base = tempfile.mkdtemp(prefix="bpttgen-fuzz-")
    try:
        for line in sys.stdin:
            job = json.loads(line)
            source = job["source"]
            digest = hashlib.sha256(source.encode()).hexdigest()[:16]
            keep = job.get("cache_dir") and jit
            workdir = os.path.join(job["cache_dir"], digest) if keep else \
                os.path.join(base, digest)
            try:
                result = run_source(source, workdir, jit,
                                    seed=zlib.crc32(source.encode()) % 100000)
            except BaseException as exc:  # noqa: BLE001 - never lose the worker's protocol
                result = {"outcome": "fail", "class": "other", "message": _short(exc),
                          "traceback": traceback.format_exc()[-8000:],
                          "signature": ["other", "fuzzer"]}
            finally:
                if not keep:
                    shutil.rmtree(workdir, ignore_errors=True)
            result["id"] = job["id"]
            result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            proto.write(json.dumps(result) + "\n")
            proto.flush()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- the pool -----------------------------------------------------------------------------

class Worker:
    def __init__(self, jit, log):
        # BPTTGEN_POISON_WORKSPACE: every work array a call does not zero starts as NaN,
        # so a kernel reading one before writing it fails the checks (runtime ArrayCache)
        env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1",
                   OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
                   BPTTGEN_POISON_WORKSPACE="1")
        if jit:
            env.pop("NUMBA_DISABLE_JIT", None)
        else:
            env["NUMBA_DISABLE_JIT"] = "1"
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.jit = jit
        self.proc = subprocess.Popen([sys.executable, THIS, "--worker"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log)
        self.buf = b""
        self.ready = False
        self.job = None
        self.deadline = time.monotonic() + 180  # imports
        self.done = 0

    def fileno(self):
        return self.proc.stdout.fileno()

    def send(self, job, timeout):
        self.job = job
        self.deadline = time.monotonic() + timeout
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()

    def read_lines(self):
        chunk = os.read(self.fileno(), 1 << 20)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(x) for x in lines if x.strip()]

    def stop(self, kill=False):
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                try:
                    self.proc.stdin.close()
                    self.proc.wait(timeout=10)
                except Exception:  # noqa: BLE001
                    self.proc.kill()
        self.proc.wait()


class Pool:
    """Up to ``size`` worker processes; each job needs a worker of its JIT mode."""

    def __init__(self, size=1, timeout=(60, 900), recycle=(200, 20), log=None,
                 cache_dir=None):
        self.size, self.timeout, self.recycle = size, timeout, recycle
        self.log = log or subprocess.DEVNULL
        self.cache_dir = cache_dir
        self.workers = []
        self.startups = []
        self.failed_starts = 0

    def run(self, jobs):
        """jobs: list of dicts with id, source, jit. Yields results as they come."""
        pending = collections.deque(jobs)
        while pending or any(w.job for w in self.workers):
            # hand out work
            for w in list(self.workers):
                if w.ready and w.job is None and pending:
                    match = next((j for j in pending if j["jit"] == w.jit), None)
                    if match is None:
                        if not any(j["jit"] == w.jit for j in pending):
                            w.stop()
                            self.workers.remove(w)
                        continue
                    pending.remove(match)
                    job = dict(match, cache_dir=self.cache_dir)
                    w.send(job, self.timeout[1] if w.jit else self.timeout[0])
            while len(self.workers) < self.size and pending:
                busy_modes = collections.Counter(w.jit for w in self.workers)
                wanted = [j["jit"] for j in pending]
                jit = pending[0]["jit"] if not busy_modes else \
                    max(set(wanted), key=lambda m: wanted.count(m) - 100 * busy_modes[m])
                self.workers.append(Worker(jit, self.log))
            if not self.workers:
                break
            now = time.monotonic()
            wait = max(0.0, min(w.deadline for w in self.workers) - now)
            readable, _, _ = select.select(self.workers, [], [], min(wait, 5.0))
            for w in readable:
                lines = w.read_lines()
                if lines is None:  # died
                    code = w.proc.wait()
                    if not w.ready:  # at start-up: the engine does not import?
                        self.failed_starts += 1
                        if self.failed_starts >= 3:
                            raise RuntimeError(
                                f"3 workers died while starting (exit status {code}); "
                                "their stderr is in --worker-log")
                    else:
                        self.failed_starts = 0
                    if w.job is not None:
                        yield {"id": w.job["id"], "outcome": "fail", "class": "other",
                               "message": f"worker process died (exit status {code})",
                               "signature": ["other", "worker died"], "jit": w.jit,
                               "times": {}, "notes": []}
                    self.workers.remove(w)
                    continue
                for msg in lines:
                    if msg.get("ready"):
                        w.ready = True
                        w.deadline = float("inf")
                        self.startups.append(msg["startup"])
                        continue
                    w.job = None
                    w.deadline = float("inf")
                    w.done += 1
                    yield msg
                if w.ready and w.job is None and \
                        w.done >= (self.recycle[1] if w.jit else self.recycle[0]):
                    w.stop()
                    self.workers.remove(w)
            now = time.monotonic()
            for w in list(self.workers):
                if now > w.deadline:
                    w.stop(kill=True)
                    self.workers.remove(w)
                    if w.job is not None:
                        limit = self.timeout[1] if w.jit else self.timeout[0]
                        yield {"id": w.job["id"], "outcome": "fail", "class": "timeout",
                               "message": f"no result within {limit} s (worker killed)",
                               "signature": ["timeout"], "jit": w.jit, "times": {},
                               "notes": []}
                    else:
                        pending.clear()
                        raise RuntimeError("a worker did not start within 180 s")

    def close(self):
        for w in self.workers:
            w.stop()
        self.workers = []


# ------------------------------------------------------------------------------------
# Shrinking
# ------------------------------------------------------------------------------------

def _size_of(spec, e, node_sizes):
    op = e[0]
    if op == "in":
        return spec["input"][e[1]]["size"]
    if op in ("prev", "cur"):
        return spec["states"][e[1]]["size"]
    if op == "node":
        return node_sizes.get(e[1])
    if op == "param":
        return next(p["shape"][0] for p in spec["params"] if p["var"] == e[1])
    if op == "mm":
        return next(p["shape"][0] for p in spec["params"] if p["var"] == e[1])
    if op in ("f", "apply", "named"):
        return _size_of(spec, e[2], node_sizes)
    if op in ("cadd", "csub", "cmul", "cpow"):
        return _size_of(spec, e[2], node_sizes)
    if op == "pow":
        return _size_of(spec, e[1], node_sizes)
    if op == "norm":
        return _size_of(spec, e[2], node_sizes)
    if op == "red":  # one number per row, no size
        return None
    return _size_of(spec, e[1] if op not in ("mexpr", "api") else e[2], node_sizes)


def _node_sizes(spec):
    out = {}
    for st in spec["body"]:
        if st["op"] == "node":
            out[st["var"]] = _size_of(spec, st["expr"], out)
    return out


def _children(e):
    """Indices of e's subexpressions."""
    op = e[0]
    if op in ("in", "prev", "cur", "node", "param"):
        return []
    if op in ("mm", "f", "apply", "named", "cadd", "csub", "cmul", "cpow"):
        return [2]
    if op in ("pow", "neg", "pyabs"):
        return [1]
    if op == "cpow":
        return [2]
    if op in ("mexpr", "api"):
        return list(range(2, len(e)))
    if op == "red":
        return [3]
    if op == "norm":  # the gain, where there is one
        return [2, 3] if e[3] else [2]
    return [1, 2]


def _paths(e, path=()):
    yield path
    for i in _children(e):
        yield from _paths(e[i], path + (i,))


def _get(e, path):
    for i in path:
        e = e[i]
    return e


def _replace(e, path, new):
    if not path:
        return new
    e = list(e)
    e[path[0]] = _replace(e[path[0]], path[1:], new)
    return e


def _map_refs(e, fn):
    """Apply fn to every leaf reference of e (returning a replacement or None)."""
    if e[0] in ("in", "prev", "cur", "node", "param"):
        r = fn(e)
        return e if r is None else r
    e = list(e)
    for i in _children(e):
        e[i] = _map_refs(e[i], fn)
    if e[0] == "mm":
        r = fn(e)
        return e if r is None else r
    return e


def _expr_slots(spec):
    """(getter, setter) for every expression of the spec."""
    slots = []
    for k in range(len(spec["body"])):
        slots.append(("body", k))
    slots.append(("output",))
    return slots


def _get_slot(spec, slot):
    return spec["body"][slot[1]]["expr"] if slot[0] == "body" else spec["output"]["expr"]


def _set_slot(spec, slot, e):
    spec = json.loads(json.dumps(spec))
    if slot[0] == "body":
        spec["body"][slot[1]]["expr"] = e
    else:
        spec["output"]["expr"] = e
    return spec


def _copy(spec):
    return json.loads(json.dumps(spec))


def _plain_leaf(spec, size, directions=(False, True)):
    """A simple vector of this size: the prev of a state of one of these directions (True
    reverse), the input, or a new bias."""
    for k, s in enumerate(spec["states"]):
        if s["size"] == size and s.get("reverse", False) in directions:
            return spec, ["prev", k]
    for j, inp in enumerate(spec["input"]):
        if inp["size"] == size:
            return spec, ["in", j]
    spec = _copy(spec)
    var = "b_s%d" % len(spec["params"])
    taken = {p["name"] for p in spec["params"]}
    name = next(f"bs{k}" for k in range(1000) if f"bs{k}" not in taken)
    spec["params"].append({"var": var, "name": name, "kind": "bias", "shape": [size]})
    return spec, ["param", var]


def _reverse_flags(spec):
    return [s.get("reverse", False) for s in spec["states"]]


def _directions_at(spec, slot):
    """The directions of the states an expression in this slot may read and stay valid:
    an update's own, a node's (those it reads already: its readers accept them), both
    in the readout or where no state runs in reverse."""
    flags = _reverse_flags(spec)
    if slot[0] == "output" or not any(flags):
        return (False, True)
    st = spec["body"][slot[1]]
    if st["op"] == "update":
        return (flags[st["state"]],)
    return tuple(_expr_directions(st["expr"], flags, spec["body"]))


def _used_params(spec):
    used = set()

    def visit(e):
        if e[0] in ("param", "mm"):
            used.add(e[1])
        for i in _children(e):
            visit(e[i])

    for st in spec["body"]:
        visit(st["expr"])
    visit(spec["output"]["expr"])
    return used


def _is_awkward(name, plain_pattern=re.compile(r"^[a-zA-Z][a-zA-Z]?\d*_?\d*$")):
    bad = set(KEYWORDS) | set(BUILTINS) | set(MODULE_NAMES) | set(KERNEL_NAMES) | set(SHAPED)
    return name in bad or not plain_pattern.match(name) or not name.isascii()


def spec_measure(spec):
    """A size to decrease: expression nodes, statements, states, params, awkwardness."""
    n = 0
    for st in spec["body"]:
        n += sum(1 for _ in _paths(st["expr"]))
    n += sum(1 for _ in _paths(spec["output"]["expr"]))
    names = [spec["model"]] + [x["name"] for x in spec["input"]] + \
        [s["name"] for s in spec["states"]] + \
        [p["name"] for p in spec["params"]] + \
        [st["name"] for st in spec["body"] if st["op"] == "node"] + list(spec["sizes"])
    awk = sum(1 for x in names if _is_awkward(x) and x not in ("cell",))
    loss = spec["loss"]
    lossw = 0 if loss["kind"] == "builtin" and loss["name"] == "sse" and \
        not loss.get("as_string") else 1 + (loss["kind"] == "custom")
    shared = sum(max(0, _param_uses(spec, p["var"]) - 1) for p in spec["params"])
    return (len(spec["states"]) * 20 + len(spec["body"]) * 5 + n + len(spec["params"]) * 2
            + shared * 3
            + len(spec["sizes"]) * 2 + awk * 3 + lossw * 2 + (spec["output"]["at"] != "every")
            + bool(spec.get("bare")) + sum(_reverse_flags(spec)) + 5 * (len(spec["input"]) - 1))


def _all_plain(spec):
    """spec with every awkward name replaced by a plain one (v1, v2, ...; sizes V1, ...)."""
    s = _copy(spec)
    taken = _all_names(spec) | {n.upper() for n in _all_names(spec)}
    counter = iter(range(1, 10 ** 6))

    def fresh(upper=False):
        while True:
            n = f"v{next(counter)}"
            n = n.upper() if upper else n
            if n not in taken:
                taken.add(n)
                return n

    s["model"] = "cell"
    for item in s["input"] + s["states"] + s["params"] + \
            [st for st in s["body"] if st["op"] == "node"]:
        if _is_awkward(item["name"]):
            item["name"] = fresh()

    def named(e):
        e = list(e)
        if e[0] == "named" and _is_awkward(e[1]):
            e[1] = fresh()
        for i in _children(e):
            e[i] = named(e[i])
        return e

    for st in s["body"]:
        st["expr"] = named(st["expr"])
    s["output"]["expr"] = named(s["output"]["expr"])
    for size in list(s["sizes"]):
        if _is_awkward(size):
            s = _rename_size(s, size, fresh(upper=True))
    if s["loss"]["kind"] == "custom":
        s["loss"]["name"] = "fuzz_loss"
        s["loss"]["sums"] = ["S", "D"][:len(s["loss"]["sums"])]
    return s


def _normalized(spec):
    """spec with plain names, sse, at="every", no bare states, no unused parameters."""
    s = _all_plain(spec)
    s["loss"] = {"kind": "builtin", "name": "sse", "as_string": False}
    s["output"]["at"] = "every"
    s["bare"] = False
    used = _used_params(s)
    s["params"] = [p for p in s["params"] if p["var"] in used]
    return s


def shrink_candidates(spec):
    """Smaller variants of spec, big cuts first."""
    node_sizes = _node_sizes(spec)
    yield _normalized(spec)
    yield _all_plain(spec)
    # 1. drop a state (its reads replaced by a plain vector)
    if len(spec["states"]) > 1:
        for k in range(len(spec["states"])):
            s = _copy(spec)
            size = s["states"][k]["size"]
            s["body"] = [st for st in s["body"] if not (st["op"] == "update" and st["state"] == k)]
            direction = s["states"][k].get("reverse", False)  # its readers accept it
            del s["states"][k]
            s, leaf = _plain_leaf(s, size, (direction,))

            def fix(e, k=k, leaf=leaf):
                if e[0] in ("prev", "cur"):
                    if e[1] == k:
                        return leaf
                    if e[1] > k:
                        return [e[0], e[1] - 1]
                return None

            if leaf[0] == "prev" and leaf[1] > k:
                leaf[1] -= 1
            for st in s["body"]:
                st["expr"] = _map_refs(st["expr"], fix)
                if st["op"] == "update" and st["state"] > k:
                    st["state"] -= 1
            s["output"]["expr"] = _map_refs(s["output"]["expr"], fix)
            yield s
    # 1a. drop one of several inputs, its reads replaced by plain vectors
    for j in range(len(spec["input"]) if len(spec["input"]) > 1 else 0):
        yield _without_input(spec, j, node_sizes)
    # 1b. every state forward
    if any(_reverse_flags(spec)):
        s = _copy(spec)
        for st in s["states"]:
            st.pop("reverse", None)
        yield s
    # 2. inline / drop a named node
    for k, st in enumerate(spec["body"]):
        if st["op"] != "node":
            continue
        for how in ("inline", "leaf"):
            s = _copy(spec)
            del s["body"][k]
            repl = st["expr"]
            if how == "leaf":
                s, repl = _plain_leaf(s, node_sizes[st["var"]], _directions_at(spec, ("body", k)))
            if how == "inline" and _has(repl, "named"):
                continue
            s_fixed = s

            def fix(e, var=st["var"], repl=repl):
                return repl if e == ["node", var] else None

            for other in s_fixed["body"]:
                other["expr"] = _map_refs(other["expr"], fix)
            s_fixed["output"]["expr"] = _map_refs(s_fixed["output"]["expr"], fix)
            yield s_fixed
    # 3. subexpressions: an operand, or a plain vector
    for slot in _expr_slots(spec):
        e = _get_slot(spec, slot)
        directions = _directions_at(spec, slot)
        for path in _paths(e):
            sub = _get(e, path)
            if sub[0] in ("in", "prev", "param", "red"):  # (a reduction has no size)
                continue
            size = _size_of(spec, sub, node_sizes)
            for i in _children(sub):
                child = sub[i]
                if sub[0] == "mm":
                    continue
                if _size_of(spec, child, node_sizes) == size:
                    yield _set_slot(spec, slot, _replace(e, path, child))
            if sub[0] == "mm" and sub[2][0] not in ("in", "prev"):
                s, leaf = _plain_leaf(spec, _size_of(spec, sub[2], node_sizes), directions)
                yield _set_slot(s, slot, _replace(e, path, ["mm", sub[1], leaf]))
            s, leaf = _plain_leaf(spec, size, directions)
            if leaf != sub:
                yield _set_slot(s, slot, _replace(e, path, leaf))
            if sub[0] in ("f", "apply", "mexpr", "api") and sub[:2] not in (["f", "tanh"],):
                # a simpler function of the same operand
                yield _set_slot(spec, slot, _replace(e, path, ["f", "tanh", sub[2]]))
    # 4. the loss, at, bare state reads
    loss = spec["loss"]
    if not (loss["kind"] == "builtin" and loss["name"] == "sse" and not loss.get("as_string")):
        s = _copy(spec)
        s["loss"] = {"kind": "builtin", "name": "sse", "as_string": False}
        yield s
        if loss["kind"] == "custom" and loss["template"] != 0 and \
                CUSTOM_LOSSES[loss["template"]][2] == "vector":
            s = _copy(spec)
            s["loss"] = dict(loss, template=0, sums=loss["sums"][:1])
            yield s
        if loss["kind"] == "custom" and loss["name"] != "fuzz_loss":
            s = _copy(spec)
            s["loss"]["name"] = "fuzz_loss"
            yield s
        if loss["kind"] == "custom" and any(_is_awkward(n) for n in loss["sums"]):
            s = _copy(spec)
            s["loss"]["sums"] = ["S", "D"][:len(loss["sums"])]
            yield s
    if spec["output"]["at"] != "every":
        s = _copy(spec)
        s["output"]["at"] = "every"
        yield s
    if spec.get("bare"):
        s = _copy(spec)
        s["bare"] = False
        yield s
    # 5. plain names
    yield from _plain_name_candidates(spec)
    # 6. merge sizes
    for a in spec["sizes"]:
        for b in spec["sizes"]:
            if a != b:
                yield _rename_size(spec, a, b)
    # 7. unshare a parameter used more than once
    for q in spec["params"]:
        for j in range(1, _param_uses(spec, q["var"])):
            yield _unshare(spec, q["var"], j)
    # 8. unused sizes and parameters
    if _without_unused_sizes(spec)["sizes"] != spec["sizes"]:
        yield _without_unused_sizes(spec)
    used = _used_params(spec)
    if any(p["var"] not in used for p in spec["params"]):
        s = _copy(spec)
        s["params"] = [p for p in s["params"] if p["var"] in used]
        yield s


def _without_input(spec, j, node_sizes):
    """spec without input j: a product of it becomes a plain vector of the product's size,
    another read a plain vector of its size (never a product of a bias, nor a state of
    a direction the place refuses), later inputs renumbered."""
    s = _copy(spec)
    del s["input"][j]
    for slot in _expr_slots(s):
        directions = _directions_at(spec, slot)

        def walk(e):
            nonlocal s
            if e[0] == "mm" and e[2] == ["in", j] or e == ["in", j]:
                s, leaf = _plain_leaf(s, _size_of(spec, e, node_sizes), directions)
                return leaf
            if e[0] == "in" and e[1] > j:
                return ["in", e[1] - 1]
            e = list(e)
            for i in _children(e):
                e[i] = walk(e[i])
            return e

        e = walk(_get_slot(s, slot))  # (may add a bias to s)
        s = _set_slot(s, slot, e)
    return _without_unused_sizes(_without_unused_params(s))


def _without_unused_sizes(spec):
    used = {x["size"] for x in spec["input"]} | {s["size"] for s in spec["states"]} | \
        {x for p in spec["params"] for x in p["shape"]}
    s = _copy(spec)
    s["sizes"] = [x for x in s["sizes"] if x in used]
    return s


def _without_unused_params(spec):
    used = _used_params(spec)
    if all(p["var"] in used for p in spec["params"]):
        return spec
    s = _copy(spec)
    s["params"] = [p for p in s["params"] if p["var"] in used]
    return s


def _param_uses(spec, var):
    def count(e):
        return (e[0] in ("mm", "param") and e[1] == var) + sum(count(e[i]) for i in _children(e))

    return sum(count(st["expr"]) for st in spec["body"]) + count(spec["output"]["expr"])


def _unshare(spec, var, j):
    """spec whose j-th use of parameter var uses a new parameter of its own."""
    s = _copy(spec)
    q = next(p for p in s["params"] if p["var"] == var)
    taken = {p["name"] for p in s["params"]} | _all_names(s)
    name = next(f"{q['name']}_u{k}" for k in range(1, 1000) if f"{q['name']}_u{k}" not in taken)
    new_var = f"{var}u{j}"
    s["params"].append(dict(q, var=new_var, name=name))
    seen = [0]

    def visit(e):
        e = list(e)
        if e[0] in ("mm", "param") and e[1] == var:
            if seen[0] == j:
                e[1] = new_var
            seen[0] += 1
        for i in _children(e):
            e[i] = visit(e[i])
        return e

    for st in s["body"]:
        st["expr"] = visit(st["expr"])
    s["output"]["expr"] = visit(s["output"]["expr"])
    return s


def _all_names(spec):
    return {x[key] for x in spec["input"] for key in ("name", "table") if x.get(key)} | \
        {s["name"] for s in spec["states"]} | \
        {p["name"] for p in spec["params"]} | \
        {st["name"] for st in spec["body"] if st["op"] == "node"} | set(spec["sizes"]) | \
        {s["name"] + "_prev" for s in spec["states"]}


def _plain_name_candidates(spec):
    taken = _all_names(spec)
    fresh = (f"{stem}{k}" for k in range(1, 1000) for stem in ("v",))

    def new_name():
        for n in fresh:
            if n not in taken:
                taken.add(n)
                return n

    def named_exprs(e, fn):
        if e[0] == "named":
            e = ["named", fn(e[1]), e[2]]
        e = list(e)
        for i in _children(e):
            e[i] = named_exprs(e[i], fn)
        return e

    if spec["model"] != "cell":
        s = _copy(spec)
        s["model"] = "cell"
        yield s
    for kind, items in (("input", spec["input"]), ("states", spec["states"]),
                        ("params", spec["params"]),
                        ("body", [st for st in spec["body"] if st["op"] == "node"])):
        for k, item in enumerate(items):
            if _is_awkward(item["name"]):
                s = _copy(spec)
                target = [x for x in s[kind] if kind != "body" or x["op"] == "node"][k]
                target["name"] = new_name()
                yield s
    # inline m.node names
    inline = []

    def collect(e):
        if e[0] == "named":
            inline.append(e[1])
        for i in _children(e):
            collect(e[i])

    for st in spec["body"]:
        collect(st["expr"])
    collect(spec["output"]["expr"])
    for name in inline:
        if _is_awkward(name):
            new = new_name()
            s = _copy(spec)
            ren = lambda n, name=name, new=new: new if n == name else n  # noqa: E731
            for st in s["body"]:
                st["expr"] = named_exprs(st["expr"], ren)
            s["output"]["expr"] = named_exprs(s["output"]["expr"], ren)
            yield s
    for size in spec["sizes"]:
        if _is_awkward(size):
            yield _rename_size(spec, size, new_name().upper())
    # unwrap an inline m.node
    for slot in _expr_slots(spec):
        e = _get_slot(spec, slot)
        for path in _paths(e):
            sub = _get(e, path)
            if sub[0] == "named":
                yield _set_slot(spec, slot, _replace(e, path, sub[2]))


def _rename_size(spec, a, b):
    s = _copy(spec)
    ren = lambda x: b if x == a else x  # noqa: E731
    s["sizes"] = list(dict.fromkeys(ren(x) for x in s["sizes"]))
    for x in s["input"]:
        x["size"] = ren(x["size"])
    for st in s["states"]:
        st["size"] = ren(st["size"])
    for p in s["params"]:
        p["shape"] = [ren(x) for x in p["shape"]]
    return s


def shrink(spec, signature, evaluate, budget=150, time_limit=240.0, log=None):
    """Greedy structural shrinking: (smallest spec failing with ``signature``, evals).

    Candidates come big cuts first; after a success the next pass resumes at the same
    position of the (new) candidate list instead of at its start, and only a pass
    from the start without a success ends the search (or the budget does)."""
    best, best_m = spec, spec_measure(spec)
    seen = {cell_source(spec)}
    evals, t0 = 0, time.monotonic()
    position, from_start = 0, True
    while evals < budget and time.monotonic() - t0 < time_limit:
        improved = False
        for k, cand in enumerate(shrink_candidates(best)):
            if k < position:
                continue
            if evals >= budget or time.monotonic() - t0 >= time_limit:
                break
            try:
                cand = _without_unused_params(cand)  # (an unused parameter is refused)
                src = cell_source(cand)
                m = spec_measure(cand)
            except Exception:  # noqa: BLE001 - an invalid candidate
                continue
            if src in seen or m >= best_m:
                continue
            seen.add(src)
            evals += 1
            res = evaluate(src)
            if res.get("signature") == signature:
                best, best_m = cand, m
                improved, position = True, k
                if log:
                    log(f"    shrink: measure {m} after {evals} evaluations")
                break
        if not improved:
            if from_start:
                break
            position, from_start = 0, True
        else:
            from_start = position == 0
    return best, evals


# ------------------------------------------------------------------------------------
# The run and its summary
# ------------------------------------------------------------------------------------

def _numbers_blanked(message):
    m = re.sub(r"(/[^\s:'\"]+)+(:\d+)?", "<path>", message)
    m = re.sub(r"\[[\d, ]*\]", "[…]", m)
    return re.sub(r"-?\b\d+(\.\d+)?(e[+-]?\d+)?\b", "N", m)


def _group_key(message):
    """A refusal message with names, paths and numbers blanked, for grouping."""
    m = re.sub(r"(/[^\s:'\"]+)+(:\d+)?", "<path>", message)
    m = re.sub(r"cannot name (a|an|the) [\w ]+? '", "cannot name <kind> '", m)
    m = re.sub(r"the generated file \S+ would", "the generated file <name>.py would", m)
    m = re.sub(r"'[^']*'", "'…'", m)
    m = re.sub(r"\"[^\"]*\"", "\"…\"", m)
    m = re.sub(r"\(\s*'…'(,\s*'…')*,?\s*\)", "(…)", m)
    m = re.sub(r"\[[^\]]*\]", "[…]", m)
    m = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "N", m)
    return m


def _fmt_times(values):
    if not values:
        return "n/a"
    return (f"mean {statistics.mean(values):.2f} s, median {statistics.median(values):.2f} s, "
            f"max {max(values):.2f} s (n={len(values)})")


def run(args):
    t_start = time.monotonic()
    indices = list(range(args.start, args.start + args.cells))
    specs = {i: generate_spec(args.seed, i) for i in indices}
    jobs = []
    for i in indices:
        jit = args.jit_every > 0 and (i % args.jit_every == args.jit_every - 1)
        jobs.append({"id": i, "source": cell_source(specs[i], header=_header(args.seed, i)),
                     "jit": jit})
    jobs.sort(key=lambda j: j["jit"])  # JIT-off cells first (quick feedback)
    log = open(args.worker_log, "a") if args.worker_log else subprocess.DEVNULL
    cache = args.cache_dir or tempfile.mkdtemp(prefix="bpttgen-fuzz-cache-")
    pool = Pool(args.workers, (args.timeout, args.jit_timeout), (args.recycle, args.recycle_jit),
                log, cache)
    results = {}
    progress = sys.stderr
    try:
        for res in pool.run(jobs):
            results[res["id"]] = res
            mark = {"ok": ".", "refused": "r"}.get(res["outcome"], "F")
            if args.verbose:
                print(f"cell {res['id']:5d} {'jit' if res.get('jit') else '   '} "
                      f"{res['outcome']:8s} {res.get('class', '')} "
                      f"{res.get('times', {}).get('total', 0):.2f}s "
                      f"{(res.get('message') or '')[:150]}", file=progress, flush=True)
            else:
                progress.write(mark)
                progress.flush()
        if not args.verbose:
            progress.write("\n")
        # shrinking
        shrunk = {}
        if args.shrink:
            by_sig = collections.defaultdict(list)
            for i in sorted(results):
                r = results[i]
                if r["outcome"] == "fail" and r["class"] != "timeout" or \
                        r["outcome"] == "refused" and any(re.search(x, r["message"])
                                                          for x in args.shrink_refusal):
                    by_sig[json.dumps(r["signature"])].append(i)
            cache_src = {}

            def evaluate_with(jit):
                def evaluate(src):
                    if (src, jit) not in cache_src:
                        out = list(pool.run([{"id": -1, "source": src, "jit": jit}]))
                        cache_src[(src, jit)] = out[0]
                    return cache_src[(src, jit)]
                return evaluate

            for sig, cells in by_sig.items():
                i = min(cells, key=lambda c: spec_measure(specs[c]))
                r = results[i]
                jit = r.get("jit", False)
                signature = r["signature"]
                if jit:  # does it fail without JIT too?  then shrink there (seconds, not
                    # minutes), as the JIT-off failure: a typing error is often the same
                    # bug as a Python-level error of the uncompiled kernels
                    plain = evaluate_with(False)(cell_source(specs[i]))
                    if plain.get("outcome") == "fail":
                        jit, signature = False, plain["signature"]
                print(f"shrinking cell {i} ({r.get('class', 'refusal')}, "
                      f"{'JIT' if jit else 'no JIT'})",
                      file=progress, flush=True)
                budget = args.shrink_budget if not jit else max(3, args.shrink_budget // 20)
                best, evals = shrink(specs[i], signature, evaluate_with(jit), budget=budget,
                                     time_limit=args.shrink_time,
                                     log=(lambda s: print(s, file=progress, flush=True))
                                     if args.verbose else None)
                final = evaluate_with(jit)(cell_source(best))
                shrunk[sig] = {"cell": i, "spec": best, "evals": evals, "jit": jit,
                               "result": final,
                               "source": cell_source(best, header=_case_header(
                                   args.seed, i, final, jit))}
    finally:
        pool.close()
        if not args.cache_dir:
            shutil.rmtree(cache, ignore_errors=True)
    wall = time.monotonic() - t_start
    summary = summarize(args, specs, results, shrunk, wall, pool.startups)
    return summary


def _header(seed, i):
    return f"bpttgen fuzz cell: python bench/fuzz.py --cell {i} --seed {seed}"


def _case_header(seed, i, result, jit):
    msg = (result.get("message") or "").strip().replace("\\", "\\\\") \
        .replace('"""', "'''")
    lines = [f"Shrunk from fuzz cell {i} of seed {seed} (python bench/fuzz.py --cell {i} "
             f"--seed {seed}{' --jit' if jit else ''}).",
             f"Failure: {result.get('class', result.get('outcome'))}"
             f"{' (compiled)' if jit else ' (NUMBA_DISABLE_JIT=1)'}.",
             *[("    " + x) for x in msg[:600].splitlines()]]
    return "\n".join(lines) + "\n"


def summarize(args, specs, results, shrunk, wall, startups):
    outcomes = collections.Counter(r["outcome"] for r in results.values())
    refusals = collections.defaultdict(list)
    failures = collections.defaultdict(list)
    notes = collections.Counter()
    for i, r in sorted(results.items()):
        if r["outcome"] == "refused":
            refusals[(r["stage"], r["type"], _group_key(r["message"]))].append((i, r["message"]))
        elif r["outcome"] == "fail":
            failures[r["class"]].append(i)
        for n in r.get("notes", []):
            notes[_numbers_blanked(n)[:70]] += 1
    times = {jit: [r["times"]["total"] for r in results.values()
                   if r.get("jit") == jit and r.get("times", {}).get("total")]
             for jit in (False, True)}
    stage_times = {jit: {k: statistics.mean([r["times"][k] for r in results.values()
                                             if r.get("jit") == jit and k in r.get("times", {})]
                                            or [0.0])
                         for k in ("build", "derive", "import", "check")}
                   for jit in (False, True)}
    return {"seed": args.seed, "start": args.start, "cells": len(results),
            "compiled": sum(1 for r in results.values() if r.get("jit")),
            "wall_s": wall, "worker_startup_s": startups,
            "max_rss_mb": max([r.get("rss_mb", 0) for r in results.values()] or [0]),
            "outcomes": dict(outcomes),
            "refusals": [{"stage": k[0], "type": k[1], "pattern": k[2], "count": len(v),
                          "cells": [i for i, _ in v], "example": v[0][1]}
                         for k, v in sorted(refusals.items(), key=lambda kv: -len(kv[1]))],
            "failures": {cls: cells for cls, cells in failures.items()},
            "failure_details": {str(i): {k: results[i].get(k) for k in
                                         ("class", "message", "signature", "jit", "traceback")}
                                for cells in failures.values() for i in cells},
            "shrunk": list(shrunk.values()),
            "notes": dict(notes),
            "time_per_cell": {"jit_off": times[False], "jit_on": times[True]},
            "stage_means": {"jit_off": stage_times[False], "jit_on": stage_times[True]}}


def print_summary(s, out=sys.stdout, tracebacks=False):
    w = lambda *a: print(*a, file=out)  # noqa: E731
    n_fail = sum(len(v) for v in s["failures"].values())
    w(f"bpttgen fuzz: seed {s['seed']}, cells {s['start']}..{s['start'] + s['cells'] - 1} "
      f"({s['cells']} cells, {s['compiled']} compiled), wall {s['wall_s']:.1f} s")
    w(f"outcomes: ok {s['outcomes'].get('ok', 0)}, refused {s['outcomes'].get('refused', 0)}, "
      f"failed {n_fail}")
    w(f"time per cell, JIT off: {_fmt_times(s['time_per_cell']['jit_off'])}")
    w(f"time per cell, JIT on:  {_fmt_times(s['time_per_cell']['jit_on'])}")
    for mode in ("jit_off", "jit_on"):
        if s["time_per_cell"][mode]:
            st = s["stage_means"][mode]
            w(f"  {mode} stage means: definition {st['build']:.2f} s, derive+render "
              f"{st['derive']:.2f} s, import {st['import']:.2f} s, checks {st['check']:.2f} s")
    if s.get("max_rss_mb"):
        w(f"largest worker memory (max RSS): {s['max_rss_mb']:.0f} MB")
    if s["worker_startup_s"]:
        w(f"worker start-up (imports): {_fmt_times(s['worker_startup_s'])}")
    if s["notes"]:
        w("notes: " + ", ".join(f"{k} x{v}" for k, v in sorted(s["notes"].items())))
    w("")
    w(f"refusals ({sum(g['count'] for g in s['refusals'])}, {len(s['refusals'])} kinds):")
    for g in s["refusals"]:
        cells = ", ".join(map(str, g["cells"][:8])) + (" ..." if g["count"] > 8 else "")
        w(f"  {g['count']:4d} x [{g['stage']}, {g['type']}] {g['pattern'][:220]}")
        w(f"         e.g. {g['example'][:300]!r}  (cells {cells})")
    w("")
    w(f"failures ({n_fail}):" + ("" if n_fail else " none"))
    for cls in FAILURE_CLASSES:
        cells = s["failures"].get(cls)
        if not cells:
            continue
        w(f"  {cls}: {len(cells)} cell(s): {', '.join(map(str, cells[:30]))}"
          + (" ..." if len(cells) > 30 else ""))
        msgs = collections.Counter(
            _numbers_blanked(s["failure_details"][str(i)]["message"] or "")[:200]
            for i in cells)
        for m, c in msgs.most_common(8):
            w(f"      {c:3d} x {m}")
    for sh in s["shrunk"]:
        r = sh["result"]
        w("")
        w(f"--- shrunk {r.get('class', r.get('outcome'))} (from cell {sh['cell']}, "
          f"{sh['evals']} evaluations, {'JIT' if sh['jit'] else 'NUMBA_DISABLE_JIT=1'}): "
          f"{(r.get('message') or '')[:400]}")
        w(sh["source"].rstrip())
        if tracebacks and r.get("traceback"):
            w("    traceback (last lines):")
            for line in r["traceback"].rstrip().splitlines()[-12:]:
                w("    | " + line)


def run_cases(paths, jit, timeout, verbose=False):
    """Run definition files (tests/fuzz_cases/*.py) through the checks; results by path.
    A case file may set EXPECT = "refused" (a refusal with a message is then a pass)."""
    jobs = [{"id": k, "source": open(p).read(), "jit": jit} for k, p in enumerate(paths)]
    pool = Pool(1, (timeout, max(timeout, 900)), (10 ** 6, 10 ** 6))
    try:
        out = {paths[r["id"]]: r for r in pool.run(jobs)}
    finally:
        pool.close()
    return out


def case_expectation(source):
    m = re.search(r"^EXPECT\s*=\s*['\"]([\w|]+)['\"]", source, re.M)
    return m.group(1) if m else "ok"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=100, help="number of cells (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first cell index (default 0)")
    ap.add_argument("--jit-every", type=int, default=10,
                    help="compile every K-th cell with Numba (0: never; default 10)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120, help="per JIT-off cell, s")
    ap.add_argument("--jit-timeout", type=float, default=900, help="per compiled cell, s")
    ap.add_argument("--recycle", type=int, default=200,
                    help="replace a JIT-off worker after this many cells")
    ap.add_argument("--recycle-jit", type=int, default=20)
    ap.add_argument("--no-shrink", dest="shrink", action="store_false")
    ap.add_argument("--shrink-budget", type=int, default=150,
                    help="evaluations per failure signature (JIT off; compiled: /20)")
    ap.add_argument("--shrink-time", type=float, default=300, help="s per failure signature")
    ap.add_argument("--shrink-refusal", metavar="REGEX", action="append", default=[],
                    help="also shrink refused cells whose message matches (repeatable)")
    ap.add_argument("--json", help="write the full summary as JSON here")
    ap.add_argument("--save-cases", metavar="DIR",
                    help="write each shrunk failing cell as a definition file into DIR")
    ap.add_argument("--cache-dir", help="keep compiled modules here (Numba's cache)")
    ap.add_argument("--worker-log", help="append the workers' stderr to this file")
    ap.add_argument("--tracebacks", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per cell")
    ap.add_argument("--cell", type=int, help="run only this cell; print source and result")
    ap.add_argument("--jit", action="store_true", help="with --cell/--case: compiled")
    ap.add_argument("--show", type=int, help="print the source of this cell and exit")
    ap.add_argument("--case", nargs="+", help="run these definition files")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        return worker_main()
    if args.show is not None:
        print(cell_source(generate_spec(args.seed, args.show), header=_header(args.seed,
                                                                               args.show)))
        return 0
    if args.case:
        out = run_cases(args.case, args.jit, args.timeout if not args.jit else args.jit_timeout)
        bad = 0
        for path in args.case:
            r = out.get(path, {"outcome": "fail", "class": "other", "message": "no result"})
            expect = case_expectation(open(path).read())
            passed = r["outcome"] in expect.split("|")
            bad += not passed
            print(f"{'pass' if passed else 'FAIL'} {path}: {r['outcome']} "
                  f"{r.get('class', '')} {(r.get('message') or '')[:300]}"
                  f" (expected {expect})")
            if not passed and args.tracebacks and r.get("traceback"):
                print(r["traceback"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return 1 if bad else 0
    if args.cell is not None:
        spec = generate_spec(args.seed, args.cell)
        src = cell_source(spec, header=_header(args.seed, args.cell))
        print(src)
        pool = Pool(1, (args.timeout, args.jit_timeout), (1, 1), cache_dir=args.cache_dir)
        try:
            r, = pool.run([{"id": args.cell, "source": src, "jit": args.jit}])
        finally:
            pool.close()
        print(json.dumps({k: v for k, v in r.items() if k != "traceback"}, indent=1))
        if r.get("traceback"):
            print(r["traceback"])
        return 0 if r["outcome"] != "fail" else 1

    s = run(args)
    print_summary(s, tracebacks=args.tracebacks)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1, default=str)
    if args.save_cases:
        os.makedirs(args.save_cases, exist_ok=True)
        for sh in s["shrunk"]:
            cls = sh["result"].get("class", "fail")
            path = os.path.join(args.save_cases,
                                f"seed{args.seed}_cell{sh['cell']}_{cls.replace('-', '_')}.py")
            with open(path, "w") as f:
                f.write(sh["source"])
            print(f"wrote {path}", file=sys.stderr)
    return 1 if s["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
