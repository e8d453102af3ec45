"""Tier 4: the CUDA modules compile to PTX, and equal the CPU modules under the simulator.

No GPU is needed; two halves run side by side on the two cores:

* in this process, every kernel of every generated CUDA module (the built-ins and a
  user's cell) and of codegen/cuda_runtime.py compiles to PTX for compute
  capabilities 8.0 and 9.0, float32 and float64, with ``numba.cuda.compile_ptx``.
  The simulator runs any Python, so only this catches typing and lowering errors;
* in a subprocess with NUMBA_ENABLE_CUDASIM=1 (tests/cuda_sim_worker.py, started
  when this module's first test runs): loss_and_grads and forward of each CUDA
  module against its CPU module, to 1e-10 in float64, at tiny ragged sizes.
  With BPTTGEN_CUDA_REAL=1 the same worker runs those cases on the real GPU
  instead (NUMBA_ENABLE_CUDASIM unset; bench/cuda_device.sh does this).

Where numba-cuda is missing the tests skip, except in CI (CI=true): there they fail.
"""

import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import cuda_sim_worker as worker

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
MISSING = 'numba-cuda is not installed: pip install -e ".[cuda]" (or ".[test]")'
BUILTIN = list(worker.BUILTIN)
CCS = [(8, 0), (9, 0)]
#: Seconds the simulator run may go without finishing a case before it is taken as
#: hung and stopped. Only a hang bound: a loaded machine that keeps finishing cases is
#: never cut off, however long the whole run takes (the slowest case takes ~100 s).
STALL_TIMEOUT = 1200
#: BPTTGEN_CUDA_REAL=1: the worker's cases on the real GPU, not the simulator.
REAL_GPU = os.environ.get("BPTTGEN_CUDA_REAL") == "1"

#: Tolerances per check (relative, see helpers.max_relative_error): float64 checks
#: differ from the CPU only in summation order; float32 in the CPU's rational tanh.
TOLERANCE = {"float32": (1e-5, 2e-3), "checkpoint": (1e-12, 1e-12)}
DEFAULT_TOLERANCE = (1e-10, 1e-10)


@pytest.fixture(scope="module", autouse=True)
def numba_cuda():
    if not HAVE_NUMBA_CUDA:
        if os.environ.get("CI"):
            pytest.fail(MISSING + "; CI must run the CUDA tests")
        pytest.skip(MISSING)


# -- the simulator run, in the background ---------------------------------------------
class SimulatorRun:
    """tests/cuda_sim_worker.py in a subprocess over the selected cases; each case's
    result is read as soon as the worker has written it."""

    stalled = False  # True once the worker was stopped as hung (STALL_TIMEOUT)
    _progress = None  # (cases finished, when the last of them was first seen)

    def __init__(self, folder, ids):
        self.out = os.path.join(folder, "cuda_sim.json")
        self.log = open(os.path.join(folder, "cuda_sim.log"), "w+")
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        if REAL_GPU:
            del env["NUMBA_ENABLE_CUDASIM"]
        env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
        self.start = time.perf_counter()
        self.process = None
        if ids:
            self.process = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "cuda_sim_worker.py"), self.out, *ids],
                cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def _read(self):
        if not os.path.exists(self.out):
            return {}
        with open(self.out) as f:  # replaced atomically by the worker
            return json.load(f)

    def _poll(self):
        """(the results so far, whether the worker has ended). A worker that finished
        no case in STALL_TIMEOUT seconds is taken as hung: it is stopped (then ended)."""
        done = self.process.poll() is not None
        results = self._read()  # after poll(): an ended worker's results are complete
        now = time.perf_counter()
        if self._progress is None:
            self._progress = (0, self.start)
        if len(results) > self._progress[0]:
            self._progress = (len(results), now)
        elif not done and now - self._progress[1] > STALL_TIMEOUT:
            self.stalled = True
            self.stop()
            done = True
        return results, done

    def result(self, case):
        """The worker's numbers for one case; None if it ended without them."""
        while True:
            results, done = self._poll()
            if case in results or done:
                return results.get(case)
            time.sleep(0.2)

    def wait(self):
        while not self._poll()[1]:
            time.sleep(0.2)
        self.seconds = time.perf_counter() - self.start
        return self._read()

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def output(self):
        self.log.seek(0)
        return self.log.read()[-4000:]


@pytest.fixture(scope="module", autouse=True)
def simulator(numba_cuda, tmp_path_factory, request):
    """Started before the first test of this module, so it overlaps the PTX tests;
    it runs only the simulator cases this session selected."""
    ids = [item.callspec.params["case"] for item in request.session.items
           if getattr(item, "originalname", None) == "test_simulator_matches_cpu"]
    run = SimulatorRun(str(tmp_path_factory.mktemp("cuda_sim")), ids)
    yield run
    run.stop()
    run.log.close()


# -- PTX --------------------------------------------------------------------------------
def _signature(kinds, float_type):
    from numba import types

    table = {"i": types.int64, "f": types.float64, "v": float_type[::1],
             "m": float_type[:, ::1], "t": types.int64[::1]}
    return tuple(table[k] for k in kinds)


#: Kernels already compiled in this session, by source text, kinds and dtype: many
#: modules emit the very same kernel (the loss, the L2 term, a readout), and the same
#: source with the same imported names compiles to the same PTX.
_COMPILED = set()


#: Kernels that sum in float64 on purpose whatever the float type (the loss's softmax
#: sums and total, the L2 penalty's), as the CPU modules do.
FLOAT64_ACCUMULATORS = {"_loss_rows", "_l2"}
#: PTX instructions that compute in float64 (not moves, loads or conversions).
F64_ARITHMETIC = re.compile(
    r"^\s*((?:add|sub|mul|div|fma|rcp|sqrt|ex2|lg2|neg|abs|min|max)\.\S*f64)\b", re.M)


def _compile_all(kernels, dtype):
    """Compile (name, function, kinds) for both compute capabilities; failures by name.
    A float32 kernel must compute in float32: float64 arithmetic in its PTX (a Python
    float in a scalar function, say) is a failure, save in FLOAT64_ACCUMULATORS. A
    consumer GPU runs float64 at 1/32 to 1/64 of its float32 rate."""
    from numba import cuda, types

    float_type = {"float32": types.float32, "float64": types.float64}[dtype]
    failures = []
    for name, function, kinds in kernels:
        source = re.sub(r"^def \w+\(", "def _(", inspect.getsource(function), flags=re.M)
        key = (source, tuple(sorted(function.__code__.co_names)), kinds, dtype)
        if key in _COMPILED:
            continue
        for cc in CCS:
            try:
                ptx, _ = cuda.compile_ptx(function, _signature(kinds, float_type), cc=cc)
                assert f".target sm_{cc[0]}{cc[1]}" in ptx and ".entry" in ptx
                wide = F64_ARITHMETIC.findall(ptx)
                if dtype == "float32" and wide and name not in FLOAT64_ACCUMULATORS:
                    failures.append(f"{name} cc={cc}: float32 kernel computes in float64 "
                                    f"({len(wide)} instructions: {sorted(set(wide))})")
            except Exception as err:  # noqa: BLE001 - collect every kernel's failure
                failures.append(f"{name} cc={cc}: {type(err).__name__}: {str(err)[:600]}")
        if not failures:
            _COMPILED.add(key)
    return failures


@pytest.fixture(scope="module")
def user_cuda_module(tmp_path_factory):
    """The user's cell, generated for CUDA into a temporary folder."""
    from bpttgen.codegen.generate import generate, import_path
    from bpttgen.derive.loader import load_model

    model = load_model(worker.user_cell_path())
    folder = tmp_path_factory.mktemp("user_cuda")
    paths = generate(model, str(folder), "pytest", target="cuda")
    return import_path(paths[0], "bpttgen_ptx_user_cuda")


#: Built-ins whose kernels' constructs all compile to PTX in cheaper ones: the
#: LayerNorm LSTM's reductions in rmsnorm's, its gates in the LSTM's (20 s cold).
PTX_COVERED = {"layernorm_lstm"}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("model", list(BUILTIN) + ["user"])
def test_kernels_compile_to_ptx(model, dtype, request):
    if model in worker.COSTLY and dtype == "float32" or model in PTX_COVERED:
        pytest.skip("helpers.COSTLY: PTX of the same constructs on a cheaper built-in")
    if model == "user":
        module = request.getfixturevalue("user_cuda_module")
    else:
        module = importlib.import_module(f"bpttgen.generated.{model}_cuda")
    kernels = [(name, k.py_func, kinds) for name, (k, kinds) in module.KERNELS.items()]
    assert kernels
    failures = _compile_all(kernels, dtype)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_runtime_kernels_compile_to_ptx(dtype):
    from bpttgen.codegen.runtime import cuda as crt

    failures = _compile_all(crt.ptx_kernels(np.dtype(dtype)), dtype)
    assert not failures, "\n".join(failures)


def test_every_kernel_is_listed():
    """KERNELS (what the PTX test compiles) holds every @cuda.jit kernel of a module."""
    for model in BUILTIN:
        module = importlib.import_module(f"bpttgen.generated.{model}_cuda")
        defined = {name for name, value in vars(module).items()
                   if type(value).__name__ == "CUDADispatcher"}
        assert defined == set(module.KERNELS), model


# -- the simulator ------------------------------------------------------------------------
@pytest.mark.parametrize("case", worker.case_ids())
def test_simulator_matches_cpu(case, simulator):
    r = simulator.result(case)
    if r is None:
        code = simulator.process.poll()
        hung = (f"; stopped after {STALL_TIMEOUT} s without finishing a case"
                if simulator.stalled else "")
        pytest.fail(f"the simulator run gave no result for {case} (exit code {code}"
                    f"{hung}):\n{simulator.output()}")
    assert "error" not in r, r.get("error")
    loss_tol, grad_tol = TOLERANCE.get(case.split(":")[1], DEFAULT_TOLERANCE)
    assert not r["bad_arrays"], f"wrong type, shape or dtype: {r['bad_arrays']}"
    assert r["loss"] <= loss_tol, f"loss differs by {r['loss']:.3g} (relative): {r}"
    assert r["grads"] <= grad_tol, f"gradients differ by {r['grads']:.3g} (relative): {r}"


def test_simulator_run_ends_cleanly(simulator):
    """The worker exits 0; its time per case is printed (pytest -s, or on failure)."""
    if simulator.process is None:
        pytest.skip("no simulator case selected")
    results = simulator.wait()
    slow = sorted(((r.get("seconds", 0.0), case) for case, r in results.items()),
                  reverse=True)[:5]
    print(f"\nsimulator run: {simulator.seconds:.1f} s; slowest cases: "
          + ", ".join(f"{case} {s:.1f} s" for s, case in slow))
    assert simulator.process.returncode == 0, simulator.output()


@pytest.mark.parametrize("kw, match", [
    (dict(algorithm="checkpoint", segment=0), "segment must be an integer >= 1"),
    (dict(algorithm="checkpoint", snapshots=-1), "snapshots must be an integer >= 0"),
    (dict(algorithm="checkpoint", memory_limit=100), "no checkpointed schedule fits"),
    (dict(segment=2), "apply to algorithm='checkpoint', not 'bptt'"),
    (dict(algorithm="rtrl"), "'rtrl' has no CUDA version"),
    (dict(memory_limit=1000), r"algorithm='bptt' on elman with T=7, B=2 needs about"),
])
def test_cuda_refuses_bad_checkpoint_options(kw, match):
    """Refused before anything reaches the device (this process has no GPU)."""
    module = importlib.import_module("bpttgen.generated.elman_cuda")
    params = module.init_params(dict(I=3, H=4, O=3), dtype=np.float64)
    x, targets = np.zeros((7, 2, 3)), np.zeros((7, 2), np.int64)
    assert "checkpoint" in module.ALGORITHMS
    with pytest.raises(ValueError, match=match):
        module.loss_and_grads(params, x, targets, **kw)


# -- the benchmark without a GPU -----------------------------------------------------------
def test_benchmark_says_no_gpu():
    from bpttgen.codegen.runtime.cuda import device_name

    if device_name() is not None:
        pytest.skip("a GPU is present: the benchmark would run")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "cuda_bench.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no CUDA GPU" in done.stderr, done.stderr
