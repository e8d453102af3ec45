"""The CUDA modules under Numba's CUDA simulator, against the CPU modules: through the
NumPy reference, which tests/test_codegen.py holds every CPU module against (the
Trainer case runs the CPU module itself).

tests/test_cuda.py runs this file in a subprocess with NUMBA_ENABLE_CUDASIM=1: the
simulator must be chosen before numba.cuda is first imported, which the main test
process has already done (it compiles the same kernels to PTX). Each case writes
its numbers (or its traceback) to a JSON file as soon as it is done; the test
process asserts on them, one test per case.

    NUMBA_ENABLE_CUDASIM=1 python tests/cuda_sim_worker.py OUT.json [CASE ...]
    BPTTGEN_CUDA_REAL=1 python tests/cuda_sim_worker.py OUT.json [CASE ...]   # real GPU

Sizes are tiny and ragged (3 and 5 against tiles of 4 and blocks of 8 threads): the
simulator runs every GPU thread as a Python thread.
"""

import importlib
import importlib.util
import inspect
import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bpttgen.derive.models import BUILTIN  # noqa: E402
from helpers import CASES, COSTLY  # noqa: E402

#: The project's user-defined cell: tests/user_cell.py where present, else the one
#: tests/test_user_model.py and tests/test_latex.py use (a user's own sympy.Function,
#: a diagonal weight, softplus, ReLU, BCE at the last step only).
USER_CELLS = [os.path.join(os.path.dirname(os.path.abspath(__file__)), *parts)
              for parts in (("user_cell.py",), ("data", "latex_cell.py"))]

#: Launch sizes under the simulator: small enough that tiny problems span several
#: tiles, blocks and reduction chunks, each with a ragged edge.
SIM_LAUNCH = dict(tile=4, block=8, chunks=2, move_grid=2)
SIZES = (3, 5)  # sizes alternate: neither divides the tile of 4
T, B = 3, 3
TBPTT = dict(algorithm="tbptt", k1=1, k2=2)  # windows overlap and truncate at T = 3
#: The checkpointed plans of each "model:checkpoint" case at T = 7, and whether every
#: argument is a device array: segments of 2 with one snapshot (segments recomputed
#: from it; two states), the default plan (segments of 3, the last of one step: views
#: of the workspace's first rows). Few: each segment is dozens of simulated launches.
#: embed_lstm: host tokens copied segment by segment into an int64 buffer, the table's
#: gradient scatter-added into the sums.
CHECKPOINT_PLANS = {"lstm": [(dict(segment=2, snapshots=1), True)],
                    "user": [({}, False)],
                    "embed_lstm": [(dict(segment=3), False)]}


def user_cell_path():
    for path in USER_CELLS:
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no user-defined cell: none of {USER_CELLS}")


def case_ids():
    """Every case, "model:check". Built-in models: bptt (with a mask, L2 and an
    initial state), tbptt and forward; a regression loss; the user's cell, generated
    by the command line, and with each of its own losses; launch sizes, device
    arrays, naive BPTT, float32 and the Trainer; checkpointed BPTT (two states, the
    user's last-step loss)."""
    ids = []
    for name in BUILTIN:  # (helpers.COSTLY: tbptt's windows on a cheaper built-in)
        # A reverse state runs no tbptt: naive's windows, mirrored for it (no other
        # built-in has them, so even a COSTLY one keeps this case).
        reverse = any(st.reverse for st in BUILTIN[name]().states.values())
        windows = [f"{name}:naive"] if reverse else [] if name in COSTLY else [f"{name}:tbptt"]
        ids += [f"{name}:bptt"] + windows + [f"{name}:forward"]
    ids += ["elman-sse:bptt"]  # the other branch of the loss kernel: vector targets
    ids += ["user:bptt", "user:tbptt", "user:forward"]
    ids += [f"user-{loss}:bptt" for loss in _user_losses()]
    ids += ["elman:device-arrays", "elman:default-launch", "gru:naive", "lstm:float32"]
    ids += ["elman:trainer"]
    ids += [f"{name}:checkpoint" for name in CHECKPOINT_PLANS]
    return ids


def _user_cell_module():
    """The user's definition file as a module (it only imports derive and SymPy)."""
    spec = importlib.util.spec_from_file_location("bpttgen_sim_user_cell", user_cell_path())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _user_losses():
    """The losses the user's cell file offers in a LOSSES table for model(loss=), but
    the default one (that is the "user" case)."""
    cell = _user_cell_module()
    losses = getattr(cell, "LOSSES", {})
    default = inspect.signature(cell.model).parameters.get("loss")
    return sorted(name for name, loss in losses.items()
                  if default is None or loss is not default.default)


# -- everything below runs in the simulator process only ------------------------------
def _modules(case, folder, cache={}):
    """(CPU module, CUDA module, derivation) of a case."""
    from bpttgen.codegen.app.cli import main as bpttgen
    from bpttgen.codegen.generate import generate, import_path
    from bpttgen.derive import derive
    from bpttgen.derive.loader import load_model

    if case in cache:
        return cache[case]
    if case in BUILTIN:
        model = CASES[case]()
        cpu = importlib.import_module(f"bpttgen.generated.{case}")
        gpu = importlib.import_module(f"bpttgen.generated.{case}_cuda")
    elif case == "user":
        # As a user would: bpttgen generate FILE --target all -o DIR.
        model = load_model(user_cell_path())
        out = os.path.join(folder, "user")
        if bpttgen(["generate", user_cell_path(), "--target", "all", "-o", out,
                    "--quiet"]) != 0:
            raise RuntimeError("bpttgen generate failed")
        cpu, gpu = (import_path(os.path.join(out, f"{model.name}{suffix}.py"),
                                f"bpttgen_sim_user{suffix}") for suffix in ("", "_cuda"))
    else:
        if case.startswith("user-"):
            cell = _user_cell_module()
            model = cell.model(loss=cell.LOSSES[case[len("user-"):]])
        else:
            model = CASES[case]()
        model.name = "sim_" + case.replace("-", "_")
        paths = generate(model, os.path.join(folder, model.name), "pytest", target="all")
        cpu, gpu = (import_path(p, f"bpttgen_sim_{os.path.basename(p)[:-3]}")
                    for p in paths)
    cache[case] = (cpu, gpu, derive(model))
    return cache[case]


class _Reference:
    """derive/reference.py behind a CPU module's loss_and_grads and forward: what the
    CUDA results are held against. tests/test_codegen.py holds every CPU module
    against the same reference (1e-12), so CUDA = reference = CPU; and this process,
    which runs beside the tests that compile the CPU modules, compiles none of them
    again (it did, for every built-in and each of the user's losses: 20-40 s each of a
    cold suite)."""

    def __init__(self, derivation):
        self.derivation = derivation

    def loss_and_grads(self, params, x, targets, *, state0=None, mask=None, l2=0.0,
                       algorithm="bptt", k1=None, k2=None):
        from bpttgen.derive import reference
        from helpers import tbptt_reference

        D = self.derivation
        # naive and epochwise compute bptt's gradient (tests/test_codegen.py)
        loss, grads = reference.loss_and_grads(D, params, x, targets, state0=state0,
                                               mask=mask, l2=l2)
        if algorithm == "tbptt":  # the same loss, the windows' gradient
            assert mask is None and not l2, "tbptt_reference takes neither"
            grads = tbptt_reference(D, params, x, targets, state0, k1, k2)
        elif algorithm not in ("bptt", "naive", "epochwise"):
            raise ValueError(f"no reference for {algorithm!r}")
        return loss, grads

    def forward(self, params, x, state0=None):
        from bpttgen.derive import reference

        return reference.forward(self.derivation, params, x, state0=state0)


def _problem(derivation, seed=1):
    from helpers import random_problem

    sizes = {s: SIZES[i % 2] for i, s in enumerate(derivation.sizes)}
    return random_problem(derivation, sizes, T=T, B=B, seed=seed)


def _compare(cpu_result, gpu_result):
    import numpy as np

    from helpers import max_relative_error

    (l0, g0), (l1, g1) = cpu_result, gpu_result
    bad = [k for k in g0 if not isinstance(g1[k], np.ndarray) or g1[k].shape != g0[k].shape
           or g1[k].dtype != g0[k].dtype]
    errors = {k: max_relative_error(g1[k], g0[k]) for k in g0}
    worst = max(errors, key=errors.get)
    return {"loss": abs(l1 - l0) / max(1.0, abs(l0)), "grads": errors[worst],
            "worst": worst, "cpu_loss": l0, "cuda_loss": l1, "bad_arrays": bad}


def run_case(case_id, folder):
    import numpy as np
    from numba import cuda

    from bpttgen.codegen.runtime import cuda as crt

    case, check = case_id.split(":")
    cpu, gpu, D = _modules(case, folder)
    if check != "trainer":  # the Trainer's loop runs around the CPU module itself
        cpu = _Reference(D)
    params, x, targets, state0 = _problem(D)
    crt.configure(**SIM_LAUNCH)
    if check == "bptt":
        mask = np.ones((T, B))
        mask[1, 0], mask[2, 2] = 0.0, 0.5
        kw = dict(state0=state0, mask=mask, l2=0.05)
        result = _compare(cpu.loss_and_grads(params, x, targets, **kw),
                          gpu.loss_and_grads(params, x, targets, **kw))
        # loss(): the forward and the loss kernel alone give the same loss
        alone = gpu.loss(params, x, targets, **kw)
        result["loss"] = max(result["loss"],
                             abs(alone - result["cpu_loss"]) / max(1.0, abs(result["cpu_loss"])))
        try:  # over memory_limit: refused before anything reaches the device
            gpu.loss(params, x, targets, memory_limit=1)
            result["bad_arrays"].append("loss() ran a call over memory_limit")
        except ValueError as err:
            if "more than memory_limit" not in str(err):
                result["bad_arrays"].append(f"loss() refused with {err}")
        return result
    if check in ("tbptt", "naive"):
        kw = TBPTT if check == "tbptt" else dict(algorithm="naive")
        return _compare(cpu.loss_and_grads(params, x, targets, state0=state0, **kw),
                        gpu.loss_and_grads(params, x, targets, state0=state0, **kw))
    if check == "forward":
        y0, s0 = cpu.forward(params, x, state0=state0)
        y1, s1 = gpu.forward(params, x, state0=state0)
        err = max([float(np.max(np.abs(y1 - y0)))] +
                  [float(np.max(np.abs(s1[k] - s0[k]))) for k in s0])
        return {"loss": 0.0, "grads": err, "bad_arrays": []}
    if check == "device-arrays":
        # Everything on the device: gradients come back as device arrays.
        dev = {k: cuda.to_device(v) for k, v in params.items()}
        loss, grads = gpu.loss_and_grads(dev, cuda.to_device(x), cuda.to_device(targets),
                                         state0={k: cuda.to_device(v)
                                                 for k, v in state0.items()})
        on_device = all(crt.is_device_array(g) for g in grads.values())
        result = _compare(cpu.loss_and_grads(params, x, targets, state0=state0),
                          (loss, {k: g.copy_to_host() for k, g in grads.items()}))
        result["bad_arrays"] += [] if on_device else ["gradients not on the device"]
        return result
    if check == "default-launch":
        # The launch sizes a real GPU gets (tiles of 16, blocks of 128): 256 Python
        # threads per GEMM block, so two steps only.
        crt.configure(tile=16, block=128, chunks=64, move_grid=1024)
        x, targets = x[:2], targets[:2]
        try:
            return _compare(cpu.loss_and_grads(params, x, targets, state0=state0),
                            gpu.loss_and_grads(params, x, targets, state0=state0))
        finally:
            crt.configure(**SIM_LAUNCH)
    if check == "float32":
        f32 = {k: v.astype(np.float32) for k, v in params.items()}
        r0 = cpu.loss_and_grads(params, x, targets, state0=state0)
        r1 = gpu.loss_and_grads(f32, x.astype(np.float32), targets,
                                state0={k: v.astype(np.float32) for k, v in state0.items()})
        bad = [k for k, g in r1[1].items() if g.dtype != np.float32]
        r1 = (r1[0], {k: g.astype(np.float64) for k, g in r1[1].items()})
        result = _compare(r0, r1)
        result["bad_arrays"] = bad
        return result
    if check == "checkpoint":
        return _checkpoint(case, cpu, gpu, D)
    if check == "trainer":
        # The CPU Trainer's loop around each module: Adam, minibatches, online tbptt.
        sizes = {s: SIZES[i % 2] for i, s in enumerate(D.sizes)}
        final, held = [], []
        for module in (cpu, gpu):
            for kw in (dict(optimizer="adam", lr=0.05),
                       dict(algorithm="tbptt", k1=2, k2=2, lr=0.1)):
                trainer = module.Trainer(sizes, dtype=np.float64, seed=3, **kw)
                trainer.fit(x, targets, epochs=1, batch_size=2, progress=False,
                            validation=(x, targets))  # the module's loss() after it
                final.append(trainer.params)
                held.append(trainer.history["val_loss"][-1])
        from helpers import max_relative_error

        err = max([max_relative_error(final[i + 2][k], final[i][k])
                   for i in (0, 1) for k in final[i]] +
                  [abs(held[i + 2] - held[i]) / max(1.0, abs(held[i])) for i in (0, 1)])
        return {"loss": 0.0, "grads": err, "bad_arrays": []}
    raise ValueError(f"unknown check {check!r}")


def _checkpoint(case, cpu, gpu, D):
    """algorithm="checkpoint" against bptt's reference (mask, L2, initial states),
    T = 7, the plans of CHECKPOINT_PLANS."""
    import numpy as np
    from numba import cuda

    from bpttgen.codegen.runtime import cuda as crt
    from helpers import random_problem

    sizes = {s: SIZES[i % 2] for i, s in enumerate(D.sizes)}
    params, x, targets, state0 = random_problem(D, sizes, T=7, B=2, seed=2)
    mask = np.ones((7, 2))
    mask[1, 0], mask[4, 1] = 0.0, 0.5
    kw = dict(state0=state0, mask=mask, l2=0.05)
    reference = cpu.loss_and_grads(params, x, targets, **kw)
    results = []
    for plan, device in CHECKPOINT_PLANS[case]:
        if device:
            dev = cuda.to_device
            args = ({k: dev(v) for k, v in params.items()}, dev(x), dev(targets))
            loss, grads = gpu.loss_and_grads(
                *args, algorithm="checkpoint", state0={k: dev(v) for k, v in state0.items()},
                mask=dev(mask), l2=0.05, **plan)
            on_device = all(crt.is_device_array(g) for g in grads.values())
            grads = {k: g.copy_to_host() for k, g in grads.items()}
        else:
            loss, grads = gpu.loss_and_grads(params, x, targets, algorithm="checkpoint",
                                             **kw, **plan)
            on_device = True
        result = _compare(reference, (loss, grads))
        result["plan"] = plan
        result["bad_arrays"] += [] if on_device else ["gradients not on the device"]
        results.append(result)
    worst = max(results, key=lambda r: (r["grads"], r["loss"]))
    worst["bad_arrays"] = [b for r in results for b in r["bad_arrays"]]
    worst["plans"] = [(r["plan"], r["loss"], r["grads"]) for r in results]
    return worst


def _serialise_shared_allocation():
    """Work around a race in Numba's simulator (numba-cuda 0.30): the first thread of
    a block to reach ``cuda.shared.array`` allocates the block's array, by a check
    and a store that are not locked. Two threads arriving together each get their own
    array and one thread's writes are lost: here, about one column sum in a few
    hundred came out wrong under load. Real shared memory has no such step. This is
    the simulator's own FakeCUDAShared.array (static arrays, keyed by the calling
    file and line), with the check and the store under a lock."""
    import threading
    import traceback as tb

    import numpy as np
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    lock = threading.Lock()
    allocate = kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory: as before
            return allocate(self, shape, dtype, alignment)
        if not isinstance(dtype, np.dtype):
            dtype = numpy_support.as_dtype(dtype)
        caller = tb.extract_stack(sys._getframe())[-2][0:2]
        with lock:
            if caller not in self._allocations:
                self._allocations[caller] = np.empty(shape, dtype)
            return self._allocations[caller]

    kernelapi.FakeCUDAShared.array = array


def main(out, ids):
    if os.environ.get("BPTTGEN_CUDA_REAL") == "1":
        # The same cases on the real GPU (tests/test_cuda.py with BPTTGEN_CUDA_REAL=1).
        if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
            raise SystemExit("BPTTGEN_CUDA_REAL=1 asks for the GPU: unset NUMBA_ENABLE_CUDASIM")
        from bpttgen.codegen.runtime.cuda import device_name

        if device_name() is None:
            raise SystemExit("BPTTGEN_CUDA_REAL=1 but numba.cuda finds no usable GPU")
    else:
        if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" or "numba.cuda" in sys.modules:
            raise SystemExit("run with NUMBA_ENABLE_CUDASIM=1 in a fresh process")
        _serialise_shared_allocation()
        # Many short simulator threads: a short GIL switch interval makes them ~3x faster.
        sys.setswitchinterval(1e-4)
    # Modules of non-built-in cases go to a folder kept between runs: generate()
    # leaves an unchanged file untouched, so Numba's cache of the CPU module beside
    # it stays valid and the next run skips compiling it.
    folder = os.path.join(tempfile.gettempdir(), "bpttgen-cuda-sim")
    results = {}
    for case_id in ids:
        start = time.perf_counter()
        try:
            results[case_id] = run_case(case_id, folder)
        except Exception:  # noqa: BLE001 - reported per case by the test process
            results[case_id] = {"error": traceback.format_exc()}
        results[case_id]["seconds"] = time.perf_counter() - start
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or case_ids())
