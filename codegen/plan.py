"""From a Derivation to a kernel plan: storage, schedule and printed code lines.

This is where the layout of the generated code is decided, never its math: the
math is the Derivation's (node expressions, the sums of its Backward, loss error), printed by
printer.py after ``sympy.cse``. What is decided here:

* storage: every vector of the step lives in a 2-D array with one row per
  (t, b) pair, row = t*B + b, so a phase that runs over all steps at once (pre,
  post) and one step of the time loop (rows t*B .. t*B+B) are the same code on
  different row ranges. A state s has (T+1)*B rows: s_{t-1} is row t*B + b,
  s_t is row (t+1)*B + b; its adjoint ``delta_s_seq`` has the same layout, so the
  adjoint of s_{t-1} written at step t is the accumulated delta of step t-1.
  A reverse state (a bidirectional layer's backward direction) mirrors it: s_t is
  row t*B + b and its previous value s_{t+1} row (t+1)*B + b, state0 (its value at
  t = T) row T*B + b; the adjoint of s_{t+1} written at step t is the accumulated
  delta of step t+1.
* time loops: the loop nodes of the forward states are the phase "loop" (t ascending
  in the forward pass, descending in the backward); those of the reverse states the
  phase "reverse" (t descending in the forward pass, ascending in the backward).
* linear groups: linear nodes of one phase that read the same vector become one
  matrix product with their weights stacked (the four LSTM gates are one GEMM).
  An embedding lookup E[x] (a linear node E onehot(x_t) of a token input) is a group
  of its own: the forward gathers column x_t of the table into its array, and the
  table's gradient adds each row's adjoint into column x_t (a scatter-add), where a
  product would multiply by one-hot vectors; a product may read its array whole.
* schedule: within a phase, products are issued as soon as their source exists
  and the elementwise nodes that are then ready, of one size, fuse into one loop.
* reductions: a reduction r = sum_k f(v_k) over the units of a vector is an array
  with one column, ``r_seq[row, 0]``, and a block of its own that runs per row, the
  unit loop inside it (``Block.per_row``): the forward sums the summand, the backward
  broadcasts its adjoint to the units. A block whose backward adds to the adjoint of
  a reduction runs per row too, summing that contribution over the units in a local
  before one store: the CPU loop and a CUDA thread (one per row) run the same lines.
* carry (opt-in, ``Plan(d, carry=True)``): every contribution the time-loop backward
  writes to the adjoint of a previous state is multiplied by ``carry[_t]``, a
  per-step factor array (length T): ones give BPTT, zeros cut the recurrence, and
  ARTBP's (1 - eps_t)/(1 - c_t) reweights it (codegen/online.py).
* shared adjoints (opt-in, ``Plan(d, share=True)``, the CPU module): a product
  read by one elementwise node gets its adjoint from that node alone, so
  - it is assigned, not accumulated (one read of the array less), where a
    truncated backward window cannot visit its rows twice;
  - two product groups whose members have equal partials in the same consumers
    (an LSTM gate's ``W x`` and ``U h_prev``) share one adjoint array;
  - a bias whose partial equals such a product's (``b`` in ``W x + U h + b``)
    takes its gradient as the column sum of that adjoint after the backward,
    one matrix-vector product, instead of ``d_b[_k] +=`` in the element loop:
    that store to a row-independent address kept the loop from vectorising
    (the LSTM backward loop's element work went from 18 to 3 ms at
    B=32, T=128, H=128; bench/frameworks.py --profile);
  - a product added with coefficient 1 (``z = W h + b``) uses its consumer's
    adjoint array as its own (no copy of d_z);
  - a post-phase product whose backward is the first write to its source's
    adjoint writes it there (``delta_h = d_z W``) instead of into a scratch
    array that is then added (the backward starts on zeroed arrays).
"""

from dataclasses import dataclass, field

import sympy as sp

from bpttgen.derive.losses import K as LOSS_K
from bpttgen.derive.losses import d as LOSS_D
from bpttgen.derive import latex, naming
from bpttgen.derive.simplify import cse

from bpttgen.codegen.printer import pycode, pycode_factor


#: The Plan's phases, in forward order: two time loops, the reverse states' second.
PHASES = ("pre", "loop", "reverse", "post")
LOOPS = ("loop", "reverse")


class PlanError(ValueError):
    """A derivation this code generator cannot lay out (named in the message)."""


@dataclass
class Group:
    """Linear nodes of one phase reading one source: a single stacked product."""

    name: str
    phase: str
    source: str
    members: list = field(default_factory=list)  # (node, weight, size, offset code)
    lookup: bool = False  # an embedding lookup: one member, source the token input

    @property
    def width(self):
        return str(sum(sp.Symbol(size) for _, _, size, _ in self.members))


@dataclass
class Block:
    kind: str  # "linear" | "elementwise" | "reduction"
    phase: str
    group: Group = None
    size: str = None
    nodes: list = field(default_factory=list)
    forward: list = field(default_factory=list)  # code lines, relative indent
    backward: list = field(default_factory=list)
    # An elementwise block's per-element lines, for element (_r, _k): what ``forward``
    # and ``backward`` run inside the CPU's row and unit loops, and a CUDA thread alone.
    forward_body: list = field(default_factory=list)
    backward_body: list = field(default_factory=list)
    # Per direction, whether the body is one row's lines (for row _r), its unit loop
    # inside: a reduction, or a backward that sums over the units into a reduction's
    # adjoint. ``size`` is then the units' size.
    forward_per_row: bool = False
    backward_per_row: bool = False


@dataclass
class Array:
    name: str
    rows: str  # "TB" or "TB1" ((T+1)*B) or "B"
    cols: str  # code for the column count
    role: str  # "value" | "adjoint" | "grad" | "scratch" | "carry"
    window: bool = False  # adjoint private to one truncated backward window


class Plan:
    """Everything the templates lay out for one Derivation."""

    def __init__(self, derivation, carry=False, share=False):
        self.d = derivation
        self.carry = carry
        self.sizes = list(derivation.sizes)
        self.prev_of = {s.prev: s for s in derivation.states}
        self.state_names = {s.name for s in derivation.states}
        self.vector_params = [p.name for p in derivation.params if p.kind == "vector"]
        self.matrix_params = [p.name for p in derivation.params if p.kind == "matrix"]
        self.nodes = {n.name: n for n in derivation.nodes}
        self.reductions = derivation.reductions()
        # each input's rows (T*B, its size), its own array: the runtime splits x's columns
        self.input_arrays = {name: naming.code_array(name) for name in derivation.input_names}
        self.numbers = latex.equation_numbers(derivation)
        self._check()
        self.groups = []
        self.member_of = {}  # linear node -> (group, offset code)
        self.blocks = {phase: self._schedule(phase) for phase in PHASES}
        self.block_of = {n: b for bl in self.blocks.values() for b in bl
                         if b.kind != "linear" for n in b.nodes}
        self.needs_array = self._adjoint_arrays()
        self.single = {}  # product -> the one Term into its adjoint, when shared
        self.alias = {}  # group name -> the group whose adjoint array it uses
        self.node_alias = {}  # group name -> the node whose adjoint array it is
        self.direct = set()  # post groups whose backward product writes its target
        self.bias_sums = {}  # (node, vector param) -> product whose adjoint it sums
        if share:
            self._share_adjoints()
        for blocks in self.blocks.values():
            for b in blocks:
                self._print(b)
        self.arrays = self._arrays()
        self.loss = self._loss_code(share)

    # -- checks ---------------------------------------------------------------
    def _check(self):
        for n in self.d.nodes:
            reads = [n.source] if n.kind == "linear" else n.args
            if n.phase == "post" and any(a in self.prev_of for a in reads):
                raise PlanError(f"the readout node '{n.name}' reads a previous state; "
                                "read the state at t instead")
            if n.kind == "linear" and n.source in self.nodes and \
                    self.nodes[n.source].kind == "linear" and not self.nodes[n.source].lookup:
                raise PlanError(f"'{n.name}' multiplies the product '{n.source}'")

    # -- storage --------------------------------------------------------------
    def phase_of(self, name):
        if name in self.input_arrays:
            return "input"
        if name in self.prev_of:
            return "reverse" if self.prev_of[name].reverse else "loop"
        return self.node_phase(self.nodes[name])

    @staticmethod
    def node_phase(node):
        """The Plan's phase of a node: the Derivation's, a reverse loop node's "reverse"."""
        return "reverse" if node.phase == "loop" and node.reverse else node.phase

    def _shifts(self, name):
        """(row shift of a previous state, of the state at t) in its (T+1)*B rows."""
        reverse = (self.prev_of[name] if name in self.prev_of else
                   next(s for s in self.d.states if s.name == name)).reverse
        return ("B", "0") if reverse else ("0", "B")

    def _state_rows(self, name, row):
        """A state's (or its previous value's) row in its (T+1)*B rows, for row ``row``."""
        shift = self._shifts(name)[0 if name in self.prev_of else 1]
        return row if shift == "0" else f"{row} + {shift}"

    def value(self, name, row="_r", col="_k"):
        """Code reading element (row, col) of a vector's value."""
        if name in self.input_arrays:
            return f"{self.input_arrays[name]}[{row}, {col}]"
        if name in self.prev_of:
            return (f"{naming.code_array(self.prev_of[name].name)}"
                    f"[{self._state_rows(name, row)}, {col}]")
        if name in self.state_names:
            return f"{naming.code_array(name)}[{self._state_rows(name, row)}, {col}]"
        if name in self.member_of:
            g, off = self.member_of[name]
            return f"{naming.code_array(g.name)}[{row}, {_plus(off, col)}]"
        if name in self.reductions:  # one number per row, whatever the unit
            return f"{naming.code_array(name)}[{row}, 0]"
        return f"{naming.code_array(name)}[{row}, {col}]"

    def adjoint(self, name, row="_r", col="_k"):
        """Code for the adjoint array element of a vector (None: an input)."""
        if name in self.input_arrays:
            return None
        if name in self.prev_of or name in self.state_names:
            return f"{self._adjoint_array(name)}[{self._state_rows(name, row)}, {col}]"
        if name in self.member_of:
            g, off = self.member_of[name]
            return f"{self.group_adjoint(g)}[{row}, {_plus(off, col)}]"
        if name in self.reductions:
            return f"{self._adjoint_array(name)}[{row}, 0]"
        return f"{self._adjoint_array(name)}[{row}, {col}]"

    def _adjoint_array(self, name):
        """The adjoint array of a vector (a state's also holds its previous value's)."""
        return naming.code_array(naming.code_adjoint(name, self.state_names))

    def local_adjoint(self, name):
        """The kernel's scalar adjoint of one element of an elementwise node (a
        state's is delta_s, as in the LaTeX, beside its array delta_s_seq)."""
        return naming.code_adjoint(name, self.state_names)

    def group_adjoint(self, group):
        """The adjoint array of a product group (another group's, or its consumer's,
        where shared)."""
        owner = self.alias.get(group.name, group.name)
        return self._adjoint_array(self.node_alias.get(owner, owner))

    def storage(self, name, adjoint=False):
        """(array, row shift, column offset) of a vector's value (or adjoint):
        element (r, k) lives at array[r + shift, offset + k]. The same places
        value() and adjoint() print, as parts, for targets that pass row offsets
        to kernels instead of slicing (the CUDA module). None: an input's adjoint."""
        if name in self.input_arrays:
            return None if adjoint else (self.input_arrays[name], "0", "0")
        array = self._adjoint_array if adjoint else naming.code_array
        if name in self.prev_of:
            return array(self.prev_of[name].name), self._shifts(name)[0], "0"
        if name in self.state_names:
            return array(name), self._shifts(name)[1], "0"
        if name in self.member_of:
            g, off = self.member_of[name]
            return (self.group_adjoint(g) if adjoint else naming.code_array(g.name)), "0", off
        return array(name), "0", "0"

    def rows(self, name, lo="_lo", hi="_hi"):
        """Code for the contiguous row slice of a vector's value array."""
        if name in self.input_arrays:
            return f"{self.input_arrays[name]}[{lo}:{hi}]"
        if name in self.prev_of or name in self.state_names:
            array = naming.code_array(self.prev_of[name].name if name in self.prev_of else name)
            shift = self._shifts(name)[0 if name in self.prev_of else 1]
            if shift == "0":
                return f"{array}[{lo}:{hi}]"
            return f"{array}[{lo} + {shift}:{hi} + {shift}]"
        if name in self.member_of:  # a lookup's group array holds it alone
            return f"{naming.code_array(self.member_of[name][0].name)}[{lo}:{hi}]"
        return f"{naming.code_array(name)}[{lo}:{hi}]"

    def size_of(self, name):
        return self.d.size_of(name)

    # -- schedule -------------------------------------------------------------
    def _schedule(self, phase):
        todo = [n for n in self.d.nodes if self.node_phase(n) == phase]
        ready = {*self.input_arrays, *self.prev_of}
        ready.update(n.name for n in self.d.nodes
                     if (phase in LOOPS and n.phase == "pre")
                     or (phase == "post" and n.phase in ("pre", "loop")))
        ready.update(self.vector_params)
        blocks = []
        while todo:
            linear = [n for n in todo if n.kind == "linear" and n.source in ready]
            for n in [n for n in linear if n.lookup]:
                group = Group(naming.code_lookup_group(n.weight, n.source), phase, n.source,
                              [(n.name, n.weight, n.size, "0")], lookup=True)
                self.member_of[n.name] = (group, "0")
                ready.add(n.name)
                todo.remove(n)
                self.groups.append(group)
                blocks.append(Block("linear", phase, group=group))
            sources = list(dict.fromkeys(n.source for n in linear if not n.lookup))
            for source in sources:
                group = Group(self._group_name(source, phase), phase, source)
                offset = []
                for n in linear:
                    if n.source == source and not n.lookup:
                        off = str(sum(sp.Symbol(o) for o in offset))
                        group.members.append((n.name, n.weight, n.size, off))
                        self.member_of[n.name] = (group, off)
                        offset.append(n.size)
                        ready.add(n.name)
                        todo.remove(n)
                self.groups.append(group)
                blocks.append(Block("linear", phase, group=group))
            elementwise = [n for n in todo if n.kind == "elementwise"
                           and set(n.args) <= ready]
            if elementwise:
                size = elementwise[0].size
                block = Block("elementwise", phase, size=size)
                progress = True
                while progress:
                    progress = False
                    for n in list(todo):
                        if n.kind == "elementwise" and n.size == size and \
                                set(n.args) <= ready:
                            block.nodes.append(n.name)
                            ready.add(n.name)
                            todo.remove(n)
                            progress = True
                blocks.append(block)
                continue
            reductions = [n for n in todo if n.kind == "reduction" and set(n.args) <= ready]
            for n in reductions:
                blocks.append(Block("reduction", phase, size=n.over, nodes=[n.name],
                                    forward_per_row=True, backward_per_row=True))
                ready.add(n.name)
                todo.remove(n)
            if not linear and not reductions:
                raise PlanError(f"cannot order the {phase} nodes {[n.name for n in todo]}")
        return blocks

    def _group_name(self, source, phase):
        name = naming.code_group(source)
        if any(g.name == name for g in self.groups):
            name = naming.code_group(source, phase)
        return name

    def _adjoint_arrays(self):
        """Elementwise nodes whose adjoint must live in an array: read by another
        block or a product, the readout, or a state (carried between steps)."""
        # a reduction's adjoint is summed by the blocks that read it, then read by its own
        needs = {self.d.loss.node} | self.state_names | self.reductions
        for n in self.d.nodes:
            if n.kind == "linear":
                needs.add(n.source)
                continue
            for a in n.args:
                if self.block_of.get(a) is not self.block_of.get(n.name):
                    needs.add(a)
        return needs

    def _share_adjoints(self):
        """The shared adjoints of the module docstring (``share``)."""
        sources = {}
        for t in self.d.backward.terms:
            if t.rule == "local" and t.target in self.member_of:
                sources.setdefault(t.target, []).append(t)
        # (a lookup may also be read by a product, whose transpose adds to its adjoint)
        read_by_product = {t.target for t in self.d.backward.terms if t.rule == "transpose"}
        self.single = {name: ts[0] for name, ts in sources.items() if len(ts) == 1
                       and name != self.d.loss.node and name not in self.state_names
                       and name not in read_by_product}
        owners = {}  # what a group's adjoint holds -> the group owning that array
        for g in sorted(self.groups, key=lambda g: g.phase not in LOOPS):
            if any(node not in self.single for node, _, _, _ in g.members):
                continue
            holds = tuple((self.single[node].via, self.single[node].expr, size, off)
                          for node, _, size, off in g.members)
            owner = owners.setdefault(holds, g)
            # A loop group's array is private to a truncated window, a pre group's
            # is not: a pre group may use a loop group's array, not the reverse.
            if owner is not g and (owner.phase == g.phase or
                                   (owner.phase in LOOPS and g.phase == "pre")):
                self.alias[g.name] = owner.name
        for g in self.groups:
            # z = W h + b: the product's adjoint is z's, already in z's array when
            # z's own backward starts (nothing in z's block reads z).
            if g.name in self.alias or len(g.members) != 1:
                continue
            t = self.single.get(g.members[0][0])
            if t is not None and t.expr == 1 and t.via in self.needs_array \
                    and t.via not in self.state_names \
                    and self.size_of(g.members[0][0]) == self.size_of(t.via) \
                    and not any(t.via in self.nodes[m].args
                                for m in self.block_of[t.via].nodes):
                self.node_alias[g.name] = t.via
        self.direct = self._first_writers()
        for n in self.d.nodes:
            leaving = self.d.backward.leaving(n.name)
            products = [t for t in leaving if self.single.get(t.target) == t]
            for t in leaving:
                if t.target in self.vector_params:
                    same = [q.target for q in products if q.expr == t.expr
                            and self.size_of(q.target) == n.size]
                    if same:
                        self.bias_sums[(n.name, t.target)] = same[0]

    def _first_writers(self):
        """Post-phase products whose backward product is the first write to their
        source's adjoint: the whole backward starts on zeroed arrays and the post
        phase runs first, once, so the product may write there itself instead of
        into a scratch array that is then added (the readout's W^T d_z). The loss
        kernel writes the output's adjoint before them."""
        written, first = {self.storage(self.d.loss.node, adjoint=True)[0]}, set()
        for block in reversed(self.blocks["post"]):
            if block.kind == "linear":
                target = self.storage(block.group.source, adjoint=True)
                if target is None:
                    continue
                if target[0] not in written and target[2] == "0" and \
                        block.group.source not in self.prev_of:
                    first.add(block.group.name)
                written.add(target[0])
                continue
            for n in block.nodes:
                for t in self.d.backward.leaving(n):
                    if t.target not in block.nodes and t.target not in self.vector_params \
                            and t.target not in self.input_arrays:
                        written.add(self.storage(t.target, adjoint=True)[0])
        return first

    def _assigns(self, node, wrt):
        """Whether node's contribution to the adjoint of wrt may be assigned (=): it
        is the only one, and no truncated window revisits the rows (a loop node
        writing a pre product's array, kept across windows, accumulates)."""
        if self.single.get(wrt) is None or self.single[wrt].via != node:
            return False
        g, _ = self.member_of[wrt]
        owner = self.alias.get(g.name, g.name)
        phase = next(h.phase for h in self.groups if h.name == owner)
        return not (self.nodes[node].phase == "loop" and phase not in LOOPS)

    def overwritten(self):
        """The adjoint arrays every call writes whole before it reads them, so that a
        call may start them holding anything (the run time's reused work arrays are
        then not zeroed first; a per-call fill of up to 8 bytes an element):

        - the output's adjoint, an array of its own: the loss kernel, which runs before
          any backward phase, assigns every row and column;
        - a time loop's product adjoint whose every member is assigned (=) by the one
          loop node it feeds (_assigns): every sweep visits each step of the arrays it
          is given, and a truncated window sweeps copies (runtime.calls.backward_windows).

        The stacked weight gradients are not here, nor zeroed: gradient_lines writes
        each whole. Whatever else is left out is zeroed at every call."""
        arrays = {a.name: a for a in self.arrays}
        out = set()
        array, shift, offset = self.storage(self.d.loss.node, adjoint=True)
        if (shift, offset) == ("0", "0") and array in arrays and arrays[array].rows == "TB" \
                and arrays[array].cols == str(self.d.loss.size):
            out.add(array)
        # (a pre group sharing a loop group's array holds the same terms: _share_adjoints)
        for g in self.groups:
            if g.phase not in LOOPS or g.name in self.alias or g.name in self.node_alias:
                continue
            array = self.group_adjoint(g)
            if array in arrays and all(
                    m in self.single and self.nodes[self.single[m].via].phase in LOOPS
                    and self._assigns(self.single[m].via, m)
                    and self.storage(m, adjoint=True)[0] == array
                    for m, _, _, _ in g.members):
                out.add(array)
        return out

    def bias_lines(self):
        """Code for the bias gradients taken as column sums of product adjoints,
        run once after the whole backward (shared adjoints)."""
        by_array = {}
        for (node, param), product in self.bias_sums.items():
            g, off = self.member_of[product]
            by_array.setdefault(self.group_adjoint(g), []).append(
                (param, off, self.size_of(product)))
        lines = []
        for array, sums in by_array.items():
            lines.append(f"_sum = np.dot(np.ones(TB, {array}.dtype), {array})")
            for param, off, size in sums:
                lines += [f"for _k in range({size}):",
                          f"    {naming.code_gradient(param)}[_k] += _sum[{_plus(off, '_k')}]"]
        return lines

    # -- printing -------------------------------------------------------------
    def code(self, e):
        """A kernel line's expression, its numbers and sizes of the kernel's float type."""
        return pycode(e, sizes=self.d.sizes)

    def code_factor(self, e):
        """code(e) as a factor of a product (parenthesised where precedence needs it)."""
        return pycode_factor(e, sizes=self.d.sizes)

    def cite(self, kind, name):
        """A trailing comment citing the LaTeX equation a printed line implements
        (``bpttgen latex MODEL`` numbers them); the readout's adjoint, when nothing
        else reads the readout, is the output error's equation."""
        number = self.equation(kind, name)
        return f"  # {number}" if number else ""

    def equation(self, kind, name):
        """"(n)", the number of the equation defining a quantity; "" if none does."""
        number = self.numbers.get(naming.equation_key(kind, name))
        if number is None and kind == "adj" and name == self.d.loss.node:
            number = self.numbers["error"]
        return f"({number})" if number else ""

    def _print(self, block):
        if block.kind == "linear":
            self._print_linear(block)
        elif block.kind == "reduction":
            self._print_reduction(block)
        else:
            self._print_elementwise(block)

    def _print_linear(self, block):
        g = block.group
        weights = naming.code_group_weights(g.name)
        if g.lookup:  # E onehot(x_t) is column x_t of E; the input has no adjoint
            block.forward = ["for _r in range(_lo, _hi):",
                             f"    _c = {self.input_arrays[g.source]}[_r]",
                             f"    for _k in range({g.width}):",
                             f"        {naming.code_array(g.name)}[_r, _k] = {weights}[_k, _c]"
                             + self.cite("fwd", g.members[0][0])]
            return
        def product(right):  # the source's rows times ``right``, into the group's rows
            return (f"np.dot({self.rows(g.source)}, {right}, "
                    f"{naming.code_array(g.name)}[_lo:_hi])")

        if g.phase in LOOPS:
            # A step's product is small: with the weights' transposed copy (given when
            # they are small, runtime.calls.SMALL_WEIGHTS) OpenBLAS takes a faster path.
            transposed = naming.code_group_transposed(g.name)
            block.forward = [f"if {transposed}.shape[0]:", f"    {product(transposed)}",
                             "else:", f"    {product(weights + '.T')}"]
        else:
            block.forward = [product(weights + ".T")]
        target = self.adjoint(g.source, row="_r", col="_k")
        if target is None:  # no gradient with respect to the input
            return
        if g.name in self.direct:
            array, shift, _ = self.storage(g.source, adjoint=True)
            rows = "[_lo:_hi]" if shift == "0" else f"[_lo + {shift}:_hi + {shift}]"
            block.backward = [f"np.dot({self.group_adjoint(g)}[_lo:_hi], {weights}, "
                              f"{array}{rows})  # the first write there "
                              + self.equation("adj", g.source)]
            return
        scratch = naming.code_scratch(g.name)
        term = f"{scratch}[_r - _lo, _k]"
        block.backward = [
            f"np.dot({self.group_adjoint(g)}[_lo:_hi], {weights}, {scratch}[:_hi - _lo])",
            "for _r in range(_lo, _hi):",
            f"    for _k in range({self.size_of(g.source)}):",
            f"        {target} += {self._carried(g.source, term)}" + self.cite("adj", g.source),
        ]

    def _local_symbols(self, expr):
        """Vector params read as ``b[_k]``; everything else by its own name."""
        return expr.xreplace({sp.Symbol(p, real=True): sp.Symbol(f"{p}[_k]")
                              for p in self.vector_params})

    def _loads(self, exprs, local, per_row=None):
        """Lines loading the vectors (and reductions) ``exprs`` read; per_row True: the
        reductions' only (one number per row), False: all but those."""
        names = sorted({s.name for e in exprs for s in e.free_symbols} - set(local))
        return [f"{n} = {self.value(n)}" for n in names
                if (n in self.nodes or n in self.prev_of or n in self.input_arrays)
                and per_row in (None, n in self.reductions)]

    def _print_elementwise(self, block):
        """A fused elementwise block: each unit of each row. What is the same for every
        unit of a row (it reads only reductions, sizes and numbers: a LayerNorm's
        1/sqrt(var + eps)) is computed once per row, before the unit loop."""
        body, exprs, local = [], [], set()
        row = RowInvariant(self.reductions | set(self.d.sizes), f"_{block.nodes[0]}_r",
                           self.code)
        for name in block.nodes:
            temps, (expr,) = cse([self._local_symbols(self.nodes[name].expr)],
                                 prefix=f"_{name}_")
            exprs.extend([self.nodes[name].expr] + [e for _, e in temps])
            body += [f"{t} = {self.code(e)}" for t, e in row.temps(temps)]
            body += [f"{name} = {self.code(row.hoist(expr))}" + self.cite("fwd", name),
                     f"{self.value(name)} = {name}"]
            local.add(name)
        per_row = self._loads(exprs, local, per_row=True) + row.lines()
        unit = self._loads(exprs, local, per_row=False) + body
        block.forward_body = per_row + unit  # a CUDA thread per unit computes both
        block.forward = _loop(block.size, unit, per_row)

        body, exprs, sums = [], [], []
        row = RowInvariant(self.reductions | set(self.d.sizes), f"_{block.nodes[0]}_b",
                           self.code)
        for name in block.nodes:
            init = self.adjoint(name) if name in self.needs_array else "_T(0)"
            cite = self.cite("adj", name) if name in self.needs_array else ""
            body.append(f"{self.local_adjoint(name)} = {init}{cite}")
        for name in reversed(block.nodes):
            terms = [t for t in self.d.backward.leaving(name) if t.target not in self.input_arrays]
            if not terms:
                continue
            temps, reduced = cse([self._local_symbols(t.expr) for t in terms],
                                 prefix=f"_{name}_")
            exprs.extend(t.expr for t in terms)
            body += [f"{v} = {self.code(e)}" for v, e in row.temps(temps)]
            written = set()
            for t, e in zip(terms, reduced):
                body += self._push(block, name, t, row.hoist(e), written, sums)
        stores = [line for line in body if "[" in line.split("=")[0]] or sums
        per_row = self._loads(exprs, set(), per_row=True) + row.lines()
        unit = self._loads(exprs, set(), per_row=False) + body
        if not stores:
            block.backward_body, block.backward = [], []
        elif sums:
            # Contributions to a reduction's adjoint: summed over the units in a local,
            # one store per row (the row's CUDA thread runs the unit loop itself).
            block.backward_per_row = True
            block.backward_body = (
                [f"{self.local_adjoint(r)} = _T(0)" for r in sums] + per_row
                + [f"for _k in range({block.size}):"]
                + ["    " + line for line in unit]
                + [f"{self.adjoint(r)} += {self.local_adjoint(r)}" + self.cite("adj", r)
                   for r in sums])
            block.backward = _rows(block.backward_body)
        else:
            block.backward_body = per_row + unit
            block.backward = _loop(block.size, unit, per_row)

    def _push(self, block, name, t, e, written, sums):
        """The line adding node ``name``'s contribution ``bar(name) * e`` (Term t) to
        its target: a local adjoint of the block, a vector parameter's gradient, a
        reduction's local sum (``sums`` collects those), or an adjoint array."""
        own = self.local_adjoint(name)
        contribution = own if e == 1 else f"{own}*{self.code_factor(e)}"
        if t.target in block.nodes:
            return [f"{self.local_adjoint(t.target)} += {contribution}"
                    + self.cite("adj", t.target)]
        if t.target in self.vector_params:
            if (name, t.target) in self.bias_sums:
                return []
            return [f"{naming.code_gradient(t.target)}[_k] += {contribution}"
                    + self.cite("grad", t.target)]
        if t.target in self.reductions:
            if t.target not in sums:
                sums.append(t.target)
            return [f"{self.local_adjoint(t.target)} += {contribution}"]
        if self.adjoint(t.target) in written | {self.adjoint(name)}:
            return []
        written.add(self.adjoint(t.target))  # a shared array: written once
        op = "=" if self._assigns(name, t.target) else "+="
        return [f"{self.adjoint(t.target)} {op} {self._carried(t.target, contribution)}"
                + self.cite("adj", t.target)]

    def _print_reduction(self, block):
        """A reduction's block, one row at a time: the forward sums the summand over
        the units; the backward gives each unit of an argument the reduction's adjoint
        times the summand's derivative."""
        name, = block.nodes
        node = self.nodes[name]
        temps, (expr,) = cse([self._local_symbols(node.expr)], prefix=f"_{name}_")
        exprs = [node.expr] + [e for _, e in temps]
        block.forward_body = (
            [f"{name} = _T(0)", f"for _k in range({block.size}):"]
            + ["    " + line for line in self._loads(exprs, set())
               + [f"{t} = {self.code(e)}" for t, e in temps] + [f"{name} += {self.code(expr)}"]]
            + [f"{self.value(name)} = {name}" + self.cite("fwd", name)])
        block.forward = _rows(block.forward_body)

        terms = [t for t in self.d.backward.leaving(name) if t.target not in self.input_arrays]
        if not terms:
            return
        temps, reduced = cse([self._local_symbols(t.expr) for t in terms], prefix=f"_{name}_")
        body, written, sums = [f"{t} = {self.code(e)}" for t, e in temps], set(), []
        for t, e in zip(terms, reduced):
            body += self._push(block, name, t, e, written, sums)
        block.backward_body = (
            [f"{self.local_adjoint(name)} = {self.adjoint(name)}" + self.cite("adj", name)]
            + [f"{self.local_adjoint(r)} = _T(0)" for r in sums]
            + [f"for _k in range({block.size}):"]
            + ["    " + line for line in self._loads([t.expr for t in terms], set()) + body]
            + [f"{self.adjoint(r)} += {self.local_adjoint(r)}" + self.cite("adj", r)
               for r in sums])
        block.backward = _rows(block.backward_body)

    def _carried(self, wrt, contribution):
        """A contribution to the adjoint of ``wrt``, times the step's carry factor
        when ``wrt`` is a forward state's previous value (it flows from step t to step
        t-1; ARTBP's cuts, which a reverse state does not take)."""
        if self.carry and wrt in self.prev_of and not self.prev_of[wrt].reverse:
            return f"carry[_t]*{contribution}"
        return contribution

    def gradient_lines(self, group):
        """A group's stacked weight gradient summed over all T*B rows: adjoint^T times
        the source rows, one product; a lookup's source rows are one-hot, so the
        product is each row's adjoint added into the column of its token."""
        gradient = naming.code_group_gradient(group.name)
        adjoint = self.group_adjoint(group)
        if not group.lookup:
            return [f"np.dot({adjoint}.T, {self.rows(group.source, lo='0', hi='TB')}, "
                    f"{gradient})"]
        return [f"{gradient}[:, :] = 0.0",
                "for _r in range(TB):",
                f"    _c = {self.input_arrays[group.source]}[_r]",
                f"    for _k in range({group.width}):",
                f"        {gradient}[_k, _c] += {adjoint}[_r, _k]"
                + self.cite("grad", group.members[0][1])]

    # -- arrays and the loss ----------------------------------------------------
    def _arrays(self):
        value, adjoint = naming.code_array, self._adjoint_array
        arrays = [Array(value(s.name), "TB1", s.size, "value") for s in self.d.states]
        arrays += [Array(value(g.name), "TB", g.width, "value") for g in self.groups]
        arrays += [Array(value(n.name), "TB", n.size, "value") for n in self.d.nodes
                   if n.kind != "linear" and n.name not in self.state_names]
        arrays += [Array(adjoint(s.name), "TB1", s.size, "adjoint", True)
                   for s in self.d.states]
        arrays += [Array(adjoint(g.name), "TB", g.width, "adjoint", g.phase in LOOPS)
                   for g in self.groups
                   if g.name not in self.alias and g.name not in self.node_alias]
        arrays += [Array(adjoint(n.name), "TB", n.size, "adjoint", n.phase == "loop")
                   for n in self.d.nodes if n.kind != "linear"
                   and n.name in self.needs_array and n.name not in self.state_names]
        arrays += [Array(naming.code_gradient(p), "1", self.size_of(p), "grad")
                   for p in self.vector_params]
        arrays += [Array(naming.code_scratch(g.name), "TB", self.size_of(g.source), "scratch")
                   for g in self.groups if g.source not in self.input_arrays
                   and g.name not in self.direct]
        if self.carry:
            arrays.append(Array("carry", "T", "1", "carry"))
        return arrays

    def _loss_code(self, share):
        info = self.d.loss
        loss = info.loss
        out_size = info.size
        k_sym = {LOSS_K: sp.Symbol(out_size)}
        sums, prediction = loss.sums, loss.prediction
        stored = _stored_summand(loss) if share else None
        if stored is not None:
            # The first pass over the units stores it in y_seq, the second reads it.
            sums = [(sym, e.xreplace({stored: sp.Symbol("_e")})) for sym, e in sums]
            prediction = prediction.xreplace(
                {stored: sp.Symbol(f"{naming.code_array('y')}[_r, _k]")})
        return {
            "size": out_size,
            "node": info.node,
            "index": loss.target == "index",
            "sums": [(sym.name, self.code(e.xreplace(k_sym))) for sym, e in sums],
            "stored": None if stored is None else self.code(stored.xreplace(k_sym)),
            "value": self.code(loss.value.xreplace(k_sym)),
            "prediction": self.code(prediction.xreplace(k_sym)),
            "error": self.code(info.error.xreplace(k_sym)),
            "uses_m": any(sp.Symbol("m", real=True) in e.free_symbols
                          for e in [loss.value, loss.prediction] + [e for _, e in loss.sums]),
        }

    # -- summaries for the templates --------------------------------------------
    def source_rows_all(self, group):
        """Rows of a group's source over all steps, for the weight-gradient GEMM."""
        return self.rows(group.source, lo="0", hi="TB")


def _stored_summand(loss):
    """A summand the prediction repeats (softmax's exp(z - m)), to compute once per
    element instead of twice; None when there is none."""
    for _, e in loss.sums:
        if not isinstance(e, sp.Symbol) and LOSS_D not in e.free_symbols \
                and loss.prediction.has(e):
            return e
    return None


def _plus(offset, col):
    return col if offset == "0" else f"{offset} + {col}"


def _rows(body):
    """A per-row body (its unit loop inside) as the CPU's loop over the rows."""
    return ["for _r in range(_lo, _hi):"] + ["    " + line for line in body]


def _loop(size, body, per_row=()):
    """The CPU's loop over the rows and, inside, the units; ``per_row`` lines first."""
    return ["for _r in range(_lo, _hi):"] + ["    " + line for line in per_row] + \
        [f"    for _k in range({size}):"] + ["        " + line for line in body]


class RowInvariant:
    """The parts of a block's per-unit expressions that are the same for every unit of
    a row: they read only ``names`` (reductions: one number per row; sizes) and
    numbers. ``hoist`` replaces each largest such part (and the row-invariant factors
    of a product, taken together) by a temporary that ``lines`` computes once per row;
    ``temps`` moves a wholly invariant CSE temporary to the row lines, under its own
    name, or reads the row temporary of the same expression in its place (each node's
    CSE repeats the block's var + eps). Exact algebra: only the rounding order may
    change."""

    def __init__(self, names, prefix, code):
        self.names, self.prefix, self.code = set(names), prefix, code
        self.rows = []  # (temporary, expression), computed once per row in this order
        self.by_expression = {}
        self.same = {}  # CSE temporary -> the row temporary of its expression

    def _invariant(self, e):
        return all(s.name in self.names for s in e.free_symbols)

    def _add(self, symbol, e):
        self.rows.append((symbol, e))
        self.by_expression.setdefault(e, symbol)
        self.names.add(symbol.name)

    def _temporary(self, e):
        if e not in self.by_expression:
            self._add(sp.Symbol(f"{self.prefix}{len(self.rows)}", real=True), e)
        return self.by_expression[e]

    def hoist(self, e):
        e = e.xreplace(self.same)
        if e.is_Atom or (e.is_Mul and all(a.is_Atom for a in e.args)):
            return e  # a scaled symbol: no cheaper per row
        if self._invariant(e):
            return self._temporary(e)
        if e.is_Mul:
            fixed = [a for a in e.args if self._invariant(a)]
            if any(not a.is_Atom for a in fixed):
                rest = [self.hoist(a) for a in e.args if not self._invariant(a)]
                return sp.Mul(self._temporary(sp.Mul(*fixed)), *rest)
        return e.func(*[self.hoist(a) for a in e.args])

    def temps(self, temps):
        """The CSE temporaries (symbol, expression) left per unit, hoisted."""
        kept = []
        for symbol, e in temps:
            e = e.xreplace(self.same)
            if self._invariant(e) and e in self.by_expression:
                self.same[symbol] = self.by_expression[e]
            elif self._invariant(e):
                self._add(symbol, e)
            else:
                kept.append((symbol, self.hoist(e)))
        return kept

    def lines(self):
        return [f"{s} = {self.code(e)}" for s, e in self.rows]
