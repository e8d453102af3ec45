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
  place of slices;
* a bias gradient line ``d_b[_k] += ...`` (a sum over rows in the CPU loop) writes
  the row's own element: in the kernel ``d_b`` is row _r of a (T*B, n) array,
  summed after the sweep by a race-free reduction (cuda_runtime.column_sums);
* the time loops are host loops of kernel launches, and the whole trajectory stays
  on the device.
"""

import re
from dataclasses import dataclass

from bpttgen.derive import naming
from bpttgen.codegen.plan import Plan, PlanError
from bpttgen.codegen.render import _block_comment, cpu_context, environment, header, member_rows

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INDENT = " " * 8


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


class CudaPlan:
    """The CUDA layout of a Plan: kernels, host launch lines per phase, arrays."""

    def __init__(self, derivation):
        self.plan = plan = Plan(derivation)
        self.d = derivation
        self.ints = ["T", "B", "TB", *derivation.sizes]
        self.arrays = [a for a in plan.arrays if a.role != "scratch"]
        # Candidate kernel arguments, in the CPU kernels' argument order, each with
        # the name the printed lines use for it.
        self.candidates = {a: a for a in self.ints + [plan.input_array, *plan.vector_params]}
        self.candidates.update((self.array_name(a), a.name) for a in self.arrays)
        self.kernels = []
        self.phases = {}
        for direction, order in (("forward", ("pre", "loop", "post")),
                                 ("backward", ("post", "loop", "pre"))):
            for phase in order:
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
                line = self._product(block.group, direction)
            else:
                line = self._elementwise(block, direction, phase, i, block_comment)
            if line:
                steps.append((block_comment, line))
        return steps

    # -- products ---------------------------------------------------------------
    def _source(self, group, adjoint):
        where = self.plan.storage(group.source, adjoint=adjoint)
        if where is not None and where[2] != "0":
            raise PlanError(f"the product '{group.name}' reads a column slice of "
                            f"'{where[0]}'; the CUDA target needs whole rows")
        return where

    def _product(self, group, direction):
        K = self.plan.size_of(group.source)
        if direction == "forward":
            array, shift, _ = self._source(group, adjoint=False)
            return (f"crt.gemm_nt({array}, {_offset('_lo', shift)}, W_{group.name}, "
                    f"{group.name}_seq, _lo, _hi - _lo, {group.width}, {K})")
        target = self._source(group, adjoint=True)
        if target is None:  # the input: no adjoint wanted
            return None
        array, shift, _ = target
        return (f"crt.gemm_nn_add(d_{group.name}_seq, _lo, W_{group.name}, {array}, "
                f"{_offset('_lo', shift)}, _hi - _lo, {K}, {group.width})")

    def weight_gradient(self, group):
        """Host code for the stacked weight gradient of a group over all T*B rows."""
        array, shift, _ = self._source(group, adjoint=False)
        K = self.plan.size_of(group.source)
        return (f'crt.gemm_tn(ws["d_{group.name}_seq"], 0, ws["{array}"], {shift}, '
                f"{group.width}, {K}, TB)")

    # -- fused elementwise blocks --------------------------------------------------
    def _elementwise(self, block, direction, phase, index, comment):
        lines = block.forward if direction == "forward" else block.backward
        if not lines:
            return None
        head = ["for _r in range(_lo, _hi):", f"    for _k in range({block.size}):"]
        if lines[:2] != head or not all(line.startswith(_INDENT) for line in lines[2:]):
            raise PlanError(f"unexpected loop shape of block {block.nodes}: {lines[:2]}")
        body = [line[len(_INDENT):] for line in lines[2:]]
        used = set(_IDENT.findall("\n".join(body))) | {block.size}
        args, prologue = ["_lo", "_hi"], []
        for arg, name in self.candidates.items():
            if name in used:
                args.append(arg)
                if name != arg:  # a gradient d_b: this thread's row of d_b_rows
                    prologue.append(f"{name} = {arg}[_r]")
        kinds = "".join("i" if a in self.ints or a in ("_lo", "_hi") else
                        "v" if a in self.plan.vector_params else "m" for a in args)
        short = "fw" if direction == "forward" else "bw"
        kernel = Kernel(f"_{short}_{phase}_{index}", f"{comment} ({direction})", block.size,
                        args, kinds, prologue, body)
        self.kernels.append(kernel)
        return f"crt.launch({kernel.name}, (_hi - _lo) * {block.size})({', '.join(args)})"

    # -- host functions --------------------------------------------------------------
    def unpack(self, direction, phase, extra=()):
        """Workspace entries a host function reads, in a stable order."""
        used = set(extra)
        for _, line in self.phases[(direction, phase)]:
            used.update(_IDENT.findall(line))
        names = [self.plan.input_array, *self.plan.vector_params] + \
            [naming.code_group_weights(g.name) for g in self.plan.groups] + \
            [self.array_name(a) for a in self.arrays]
        return [n for n in names if n in used]


def _offset(base, shift):
    return base if shift == "0" else f"{base} + {shift}"


def cuda_context(derivation):
    ctx = cpu_context(derivation)
    cp = CudaPlan(derivation)
    plan = cp.plan
    rows = {"TB": "(T * B, {})", "TB1": "((T + 1) * B, {})", "1": "(T * B, {})"}
    arrays = [dict(name=cp.array_name(a), shape=rows[a.rows].format(a.cols),
                   zero=a.role != "value") for a in cp.arrays]
    groups = []
    for g, members in zip(plan.groups, member_rows(plan.groups)):
        groups.append(dict(name=g.name, weights=[w for _, w, _, _ in g.members],
                           gradient=cp.weight_gradient(g), members=members))
    functions = []
    for direction, phase in cp.phases:
        functions.append(dict(
            name=f"_{direction}_{phase}", direction=direction, phase=phase,
            steps=cp.phases[(direction, phase)],
            unpack=cp.unpack(direction, phase)))
    index = derivation.loss.loss.target == "index"
    ctx.update(
        kernels=cp.kernels,
        functions=functions,
        cuda_arrays=arrays,
        cuda_groups=groups,
        ints=cp.ints,
        target_kind="t" if index else "m",
        dummy_targets="(T * B,)" if index else f"(T * B, {derivation.loss.size})",
    )
    return ctx


def render_cuda(derivation, command):
    """Source text of the CUDA module for a Derivation."""
    body = environment().get_template("cuda_module.py.j2").render(
        header="", **cuda_context(derivation)).lstrip("\n")
    return header(command, body) + body
