"""Render the CUDA module of a Derivation: generated/<model>_cuda.py.

Data flow: Derivation -> codegen.plan.Plan (the very plan of the CPU target) -> this
module -> templates/cuda_module.py.j2. Print before render: every piece of code
reaching the template is text made here or printed by the Plan from SymPy.

Shared with the CPU module, unchanged: storage layout (row t*B + b), product groups,
the schedule of blocks, and every per-element line the Plan printed (forward and
backward of each fused elementwise block, the loss). A CPU kernel runs those lines
inside ``for _r in range(_lo, _hi): for _k in range(size):``; a CUDA kernel runs
them once per thread, with _r and _k taken from the thread index. The scalar
functions they call (sigmoid, softplus, ...) are the same @njit functions of
codegen/runtime.py, which Numba compiles for the device too. What differs:

* a product group is a launch of cuda_runtime's tiled GEMM, with row offsets in
  place of slices; an embedding lookup's group a gather (its table's gradient a
  scatter-add, cuda_runtime.lookup_gradient_add);
* a bias gradient line ``d_b[_k] += ...`` (a sum over rows in the CPU loop) writes
  the row's own element: in the kernel ``d_b`` is row _r of a (T*B, n) array,
  summed after the sweep by a race-free reduction (cuda_runtime.column_sums);
* a per-row block (a reduction, or a backward summing into a reduction's adjoint,
  ``Block.per_row``) is a kernel with one thread per row, running the unit loop the
  Plan printed inside it: no two threads add to one row's sum, no atomics;
* the time loops are host loops of kernel launches, and the whole trajectory stays
  on the device.
"""

from dataclasses import dataclass

from bpttgen.derive import naming
from bpttgen.codegen.plan import Plan, PlanError
from bpttgen.codegen.render import (_block_comment, define_float_type, environment, header,
                                    model_context, state_adjoints, window_local,
                                    wrap_long_lines)



@dataclass
class Kernel:
    """One fused elementwise block as a CUDA kernel: a thread per (row, unit)."""

    name: str
    doc: str
    size: str
    args: list
    kinds: str  # per argument: "i" int64, "v" 1-D float array, "m" 2-D float array
    prologue: list
    body: list
    per_row: bool = False  # a thread per row, the body's unit loop inside


class CudaPlan:
    """The CUDA layout of a Plan: kernels, host launch lines per phase, arrays.

    Which arrays, sizes and parameters a kernel or a host function needs comes from
    the structure the Plan printed its lines from (blocks, storage, the nodes and the
    backward sums of the Derivation), never from the printed text."""

    def __init__(self, derivation):
        self.plan = plan = Plan(derivation)
        self.d = derivation
        self.ints = ["T", "B", "TB", *derivation.sizes]
        self.arrays = [a for a in plan.arrays if a.role != "scratch"]
        # Candidate kernel arguments, in the CPU kernels' argument order, each with
        # the name the printed lines use for it.
        self.candidates = {a: a for a in self.ints + [*plan.input_arrays.values(), *plan.vector_params]}
        self.candidates.update((self.array_name(a), a.name) for a in self.arrays)
        self.gradient_of = dict(zip(plan.vector_params,
                                    [a for a in plan.arrays if a.role == "grad"]))
        self.kernels = []
        self.phases, self.uses = {}, {}
        # a bidirectional layer's reverse states: a second time loop after the first
        loops = ("loop", "reverse") if derivation.bidirectional else ("loop",)
        for direction, order in (("forward", ("pre", *loops, "post")),
                                 ("backward", ("post", *loops, "pre"))):
            for phase in order:
                self.uses[(direction, phase)] = set()
                self.phases[(direction, phase)] = self._phase(direction, phase)

    @staticmethod
    def array_name(array):
        """A vector parameter's gradient d_b keeps one row per (t, b): d_b_rows."""
        return f"{array.name}_rows" if array.role == "grad" else array.name

    def _phase(self, direction, phase):
        blocks = self.plan.blocks[phase]
        if direction == "backward":
            blocks = list(reversed(blocks))
        steps = []
        for i, block in enumerate(blocks):
            block_comment = _block_comment(self.plan, block)
            if block.kind == "linear":
                step = self._product(block.group, direction)
            else:
                step = self._elementwise(block, direction, phase, i, block_comment)
            if step:
                line, names = step
                steps.append((block_comment, line))
                self.uses[(direction, phase)].update(names)
        return steps

    # -- products ---------------------------------------------------------------
    def _source(self, group, adjoint):
        where = self.plan.storage(group.source, adjoint=adjoint)
        if where is not None and where[2] != "0":
            raise PlanError(f"the product '{group.name}' reads a column slice of "
                            f"'{where[0]}'; the CUDA target needs whole rows")
        return where

    def _product(self, group, direction):
        """(launch line, workspace entries it reads) of a product group."""
        K = self.plan.size_of(group.source)
        weights = naming.code_group_weights(group.name)
        if group.lookup:  # a gather; the token input has no adjoint
            out = self.plan.storage(group.members[0][0])[0]
            x = self.plan.input_arrays[group.source]
            return ((f"crt.lookup({x}, _lo, {weights}, {out}, _lo, _hi - _lo, {group.width})",
                     {x, weights, out}) if direction == "forward" else None)
        if direction == "forward":
            array, shift, _ = self._source(group, adjoint=False)
            out = self.plan.storage(group.members[0][0])[0]  # the group's value array
            return (f"crt.gemm_nt({array}, {_offset('_lo', shift)}, {weights}, {out}, _lo, "
                    f"_hi - _lo, {group.width}, {K})"), {array, weights, out}
        target = self._source(group, adjoint=True)
        if target is None:  # the input: no adjoint wanted
            return None
        array, shift, _ = target
        adjoint = self.plan.group_adjoint(group)
        line = (f"crt.gemm_nn_add({adjoint}, _lo, {weights}, {array}, "
                f"{_offset('_lo', shift)}, _hi - _lo, {K}, {group.width})")
        return line, {adjoint, weights, array}

    # -- fused elementwise blocks --------------------------------------------------
    def _uses(self, block, direction):
        """The names a block's lines read and write: its size, the arrays of the values
        and adjoints they load and store (with the sizes of their row shift and column
        offset) and the vector parameters they read or whose gradient they add to."""
        plan, d, inside = self.plan, self.d, set(block.nodes)
        used = {block.size}
        ints = set(self.ints)

        def stored(name, adjoint=False):
            array, shift, _ = plan.storage(name, adjoint=adjoint)
            used.add(array)
            used.update([shift] if shift != "0" else [])
            if name in plan.member_of:  # column offset: the sizes of the members before
                group, _ = plan.member_of[name]
                members = [m[0] for m in group.members]
                used.update(m[2] for m in group.members[:members.index(name)])

        def loads(symbols):
            for s in symbols:
                if s in plan.nodes or s in plan.prev_of or s in plan.input_arrays:
                    stored(s)
                elif s in plan.vector_params or s in ints:  # a size: a mean's divisor
                    used.add(s)

        for name in block.nodes:
            node = plan.nodes[name]
            if direction == "forward":
                loads(a for a in node.args if a not in inside)
                used.update(p for p in node.params if p in plan.vector_params)
                used.update(s.name for s in node.expr.free_symbols if s.name in ints)
                stored(name)
                continue
            terms = [t for t in d.backward.leaving(name) if t.target not in plan.input_arrays]
            loads({s.name for t in terms for s in t.expr.free_symbols})
            if name in plan.needs_array:
                stored(name, adjoint=True)
            for t in terms:
                if t.target in plan.vector_params:
                    used.add(self.gradient_of[t.target].name)
                elif t.target not in inside:
                    stored(t.target, adjoint=True)
        return used

    def _elementwise(self, block, direction, phase, index, comment):
        """(launch line, workspace entries it reads) of a fused elementwise block."""
        body = block.forward_body if direction == "forward" else block.backward_body
        if not body:
            return None
        used = self._uses(block, direction)
        args, prologue = ["_lo", "_hi"], []
        for arg, name in self.candidates.items():
            if name in used:
                args.append(arg)
                if name != arg:  # a gradient d_b: this thread's row of d_b_rows
                    prologue.append(f"{name} = {arg}[_r]")
        kinds = "".join("i" if a in self.ints or a in ("_lo", "_hi") else
                        "v" if a in self.plan.vector_params else "m" for a in args)
        short = "fw" if direction == "forward" else "bw"
        per_row = block.forward_per_row if direction == "forward" else block.backward_per_row
        kernel = Kernel(f"_{short}_{phase}_{index}", f"{comment} ({direction})", block.size,
                        args, kinds, prologue, body, per_row)
        self.kernels.append(kernel)
        threads = "_hi - _lo" if per_row else f"(_hi - _lo) * {block.size}"
        return f"crt.launch({kernel.name}, {threads})({', '.join(args)})", args

    # -- host functions --------------------------------------------------------------
    def unpack(self, direction, phase):
        """Workspace entries a host function reads, in a stable order."""
        used = self.uses[(direction, phase)]
        names = [*self.plan.input_arrays.values(), *self.plan.vector_params] + \
            [naming.code_group_weights(g.name) for g in self.plan.groups] + \
            [self.array_name(a) for a in self.arrays]
        return [n for n in names if n in used]


def _offset(base, shift):
    return base if shift == "0" else f"{base} + {shift}"


def cuda_context(derivation):
    """The template context of a CUDA module: the model's (render.model_context) and
    the CUDA layout of its Plan (no shared adjoints, no carry: one adjoint array per
    group, per-row bias gradients)."""
    cp = CudaPlan(derivation)
    plan = cp.plan
    d = derivation
    rows = {"TB": "(T * B, {})", "TB1": "((T + 1) * B, {})", "1": "(T * B, {})"}
    groups = []
    for g in plan.groups:
        source, shift, _ = cp._source(g, adjoint=False)
        groups.append((naming.code_group_weights(g.name), plan.group_adjoint(g), source,
                       shift != "0", g.lookup, tuple(w for _, w, _, _ in g.members)))
    functions = []
    for direction, phase in cp.phases:
        functions.append(dict(
            name=f"_{direction}_{phase}", direction=direction, phase=phase,
            steps=cp.phases[(direction, phase)],
            unpack=cp.unpack(direction, phase)))
    index = d.loss.loss.target == "index"
    return dict(
        model_context(d, plan),
        kernels=cp.kernels,
        functions=functions,
        cuda_arrays=[dict(name=cp.array_name(a), shape=rows[a.rows].format(a.cols))
                     for a in cp.arrays],
        cuda_zeros=repr(tuple(cp.array_name(a) for a in cp.arrays if a.role != "value")),
        cuda_groups=repr(tuple(groups)),
        output_arrays=(plan.storage(d.loss.node)[0], plan.storage(d.loss.node, adjoint=True)[0]),
        state_arrays=repr({s.name: plan.storage(s.name)[0] for s in d.states}),
        state_adjoints=repr(state_adjoints(plan, d)),
        vector_gradients=repr({p: cp.array_name(g) for p, g in cp.gradient_of.items()}),
        window_local=repr(window_local(plan)),
        ints=cp.ints,
        target_kind="t" if index else "m",
        algorithms="BIDIRECTIONAL_ALGORITHMS" if d.bidirectional else "ALGORITHMS",
    )


def render_cuda(derivation, command):
    """Source text of the CUDA module for a Derivation."""
    context = cuda_context(derivation)
    text = environment().get_template("cuda_module.py.j2").render(header="", **context)
    floats = [a for k in context["kernels"] for a, kind in zip(k.args, k.kinds) if kind in "vm"]
    floats += list(context["output_arrays"])  # the loss kernel's
    body = wrap_long_lines(define_float_type(text.lstrip("\n"), floats))
    return header(command, body) + body
