"""The CUDA modules on a real GPU: correct against the CPU modules, timed against them and cuDNN.

One run, one JSON file (written again after every finished piece, so that a run
cut short keeps what it measured). Stages, each model in a subprocess of its own:
a hang or a crash costs that model only, and every worker has its own Numba cache
folder, so that compiles running side by side never write one cache index (two
processes saving different signatures of one function can cross their entries).

  probe  versions (Python, NumPy, Numba, numba-cuda, CUDA driver, runtime, NVVM,
         torch, cuDNN), the GPU and its compute capability; one tiny loss_and_grads
         of generated/elman_cuda.py. Exit status 3 when it cannot run.
  check  every built-in model, all models at once (--jobs): generated/<m>_cuda.py
         against generated/<m>.py, loss_and_grads with every algorithm of the CUDA
         module's ALGORITHMS, and forward(), in float64 and float32, at
           tiny    (B, T, I, H, O) = (3, 5, 3, 5, 4): none a multiple of the tile
                   (16) or the block (128); with state0, a mask and L2 on bptt;
           ragged  (37, 9, 33, 65, 17): several tiles and blocks, each with a ragged
                   edge; also device arrays in and out (must give the same bits as
                   NumPy in and out, and the same bits twice: the kernels are
                   deterministic), and other launch sizes (tiles of 8 and 32);
           bench   the sizes of bench/frameworks.py (bptt, tbptt, forward).
         Extra hidden sizes of a model (deep's F) are H+1, H+2, ...
  time   float32 loss + all gradients of elman, lstm, gru at bench/frameworks.py's
         sizes: the CUDA module with device arrays in and out (synchronised before
         the clock stops), with NumPy arrays in and out (transfers included), the
         CPU module (all cores: NUMBA/BLAS threads as the machine gives them,
         recorded), and torch.nn.RNN/LSTM/GRU on the GPU (cuDNN; forward, readout,
         softmax cross-entropy, backward: the built-ins' loss) where torch sees the
         GPU, with TF32 off (like for like: bpttgen multiplies in plain float32)
         and with torch's defaults. Median over interleaved rounds after warm-up
         (frameworks.timed_rounds); the first call (kernel compilation, cache load,
         cuDNN set-up) separately. Also the float32 GEMM rate at 4096^3 of the
         modules' tiled kernel and of cuBLAS through CuPy (bench/cuda_bench.py).

Tolerances. float64: the CUDA result equals the CPU module's to 1e-10, relative
(every gradient array: max |a - b| / max |b|, as bench/frameworks.py; and the
test suite's elementwise measure, codegen.gradcheck.max_relative_error; the loss
|a - b| / |b|); only the summation order differs. float32: the CUDA module's float32
result against the CPU module's float64 result on the same (float32-rounded) inputs,
to 1e-4 relative per gradient array (max |a - b| / max |b|) and on the loss: the
bound bench/frameworks.py puts on float32 frameworks against each other. Float32
sums over T*B = 8192 rows of terms of both signs leave single elements with few
correct digits, so the elementwise measure is recorded in float32, not judged;
the CPU module's own float32 error against float64 is recorded beside it (for the
timed models) as the yardstick of what float32 rounding costs at that size.

    python bench/cuda_device.py [--out FILE] [--stages probe,check,time] [--quick]
                                [--sizes B,T,I,H,O ...] [--models m1,m2] [--jobs N]
    NUMBA_ENABLE_CUDASIM=1 python bench/cuda_device.py --quick --sizes 2,3,3,4,3

Under the CUDA simulator (--quick only) it checks that the script works; its
times mean nothing. bench/cuda_device.sh runs the stages and tests/test_cuda.py on a
GPU machine.
"""

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback

# The repository root on the path, for bpttgen where it is not installed (the device
# machine runs the checkout with PYTHONPATH). (bench/cuda_bench.py was once cuda.py,
# which shadowed NVIDIA's "cuda" package for every script in this folder.)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fw = _load("bench_frameworks", os.path.join(HERE, "frameworks.py"))  # timed_rounds, torch mapping
bc = _load("bench_cuda", os.path.join(HERE, "cuda_bench.py"))  # gemm_rates

MODELS = ("elman", "elman_sigmoid", "lstm", "gru", "deep", "elman2", "lstm2")
TIMED = ("elman", "lstm", "gru")
TINY = (3, 5, 3, 5, 4)  # B, T, I, H, O
RAGGED = (37, 9, 33, 65, 17)
SIM_SIZE = (2, 3, 3, 4, 3)
TOL = {"float64": dict(loss=1e-10, grads=1e-10, elem=1e-10),
       "float32": dict(loss=1e-4, grads=1e-4, elem=None)}
#: Launch sizes under the simulator (tests/cuda_sim_worker.py's): tiny problems
#: still span several tiles and blocks.
SIM_LAUNCH = dict(tile=4, block=8, chunks=2, move_grid=2)
#: Other launch sizes checked at the ragged size (the defaults are tile 16, block 128).
LAUNCHES = {"tile8": dict(tile=8, block=64, chunks=4, move_grid=8),
            "tile32": dict(tile=32, block=256, chunks=64, move_grid=1024)}
PARTS = os.path.join(os.environ.get("TMPDIR", "/tmp"), "bpttgen-cuda-device")


# ======================================================================================
# workers: each runs in its own process (python bench/cuda_device.py --worker ...)
# ======================================================================================
class Part:
    """A worker's results, written atomically to its part file after every row."""

    def __init__(self, path):
        self.path, self.data = path, {"rows": []}

    def add(self, row):
        self.data["rows"].append(row)
        self.save()

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def _simulator_setup():
    """Under NUMBA_ENABLE_CUDASIM=1: small launch sizes, and the test worker's lock
    around the simulator's shared-array allocation (a race of the simulator)."""
    from bpttgen.codegen.runtime import cuda as crt

    crt.configure(**SIM_LAUNCH)
    try:
        worker = _load("bpttgen_cuda_sim_worker", os.path.join(ROOT, "tests",
                                                                "cuda_sim_worker.py"))
        worker._serialise_shared_allocation()
    except Exception as err:  # noqa: BLE001 - the race is rare; go on without the lock
        print(f"(simulator shared-array lock not installed: {err})")
    sys.setswitchinterval(1e-4)


def _is_simulator():
    import numba

    return bool(numba.config.ENABLE_CUDASIM)


def _versions():
    import importlib.metadata as md

    out = {"python": platform.python_version(), "executable": sys.executable}
    for dist in ("numpy", "scipy", "numba", "numba-cuda", "llvmlite", "cuda-bindings",
                 "cuda-core", "cuda-python", "nvidia-nvvm", "nvidia-cuda-nvcc",
                 "nvidia-cuda-nvrtc", "nvidia-nvjitlink", "torch", "cupy-cuda13x",
                 "cupy-cuda12x", "sympy", "jinja2"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def worker_probe(args, part):
    import numpy as np

    info = {"versions": _versions(), "machine": fw.machine(), "source": fw.source_version()}
    part.data["info"] = info
    part.save()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.max.sm,clocks.max.mem,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30)
        info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.SubprocessError) as err:
        info["nvidia_smi"] = f"not available: {err}"
    import numba
    from numba import cuda

    from bpttgen.codegen.runtime import cuda as crt

    info["simulator"] = bool(numba.config.ENABLE_CUDASIM)
    info["cuda_available"] = bool(cuda.is_available())
    info["device"] = crt.device_name()
    part.save()
    if info["device"] is None:
        # Why: the driver's own error (numba.cuda.is_available() swallows it).
        import contextlib
        import io

        try:
            cuda.get_current_device()
        except Exception as err:  # noqa: BLE001 - recorded
            info["cuda_error"] = f"{type(err).__name__}: {err}"
        text = io.StringIO()
        try:
            with contextlib.redirect_stdout(text):
                cuda.detect()
        except Exception as err:  # noqa: BLE001 - recorded
            text.write(f"cuda.detect() failed: {type(err).__name__}: {err}")
        info["cuda_detect"] = text.getvalue()[-3000:]
        part.save()
        print(f"no usable GPU: {info.get('cuda_error')}\n{info['cuda_detect']}")
        raise SystemExit(3)
    if not info["simulator"]:
        dev = cuda.get_current_device()
        for key, get in (
                ("compute_capability", lambda: dev.compute_capability),
                ("multiprocessors", lambda: [dev.MULTIPROCESSOR_COUNT]),
                ("driver_cuda_version", lambda: cuda.cudadrv.driver.driver.get_version()),
                ("runtime_cuda_version", lambda: cuda.runtime.get_version()),
                ("nvvm_version", lambda: cuda.cudadrv.nvvm.NVVM().get_version()),
                ("memory_free_total_gib", lambda: [round(v / 2**30, 1) for v in
                                                   cuda.current_context().get_memory_info()])):
            try:
                info[key] = list(get())
            except Exception as err:  # noqa: BLE001 - informative only
                info[key] = f"unknown: {type(err).__name__}: {err}"
    else:
        _simulator_setup()
    part.save()
    # One tiny call through every kind of kernel: compile (NVVM), link, launch, copy back.
    gpu = importlib.import_module("bpttgen.generated.elman_cuda")
    sizes = {"I": 3, "H": 5, "O": 4}
    params = gpu.init_params(sizes, dtype=np.float32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 3)).astype(np.float32)
    targets = rng.integers(0, 4, (4, 3))
    t = time.perf_counter()
    loss, grads = gpu.loss_and_grads(params, x, targets)
    info["probe_call_s"] = round(time.perf_counter() - t, 3)
    finite = math.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads.values())
    info["probe_loss"] = loss
    info["probe_ok"] = bool(finite and abs(loss - math.log(4)) < 0.5)
    try:
        import torch

        info["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                         "cuda_available": bool(torch.cuda.is_available())}
        if torch.cuda.is_available():
            info["torch"]["cudnn"] = torch.backends.cudnn.version()
            info["torch"]["device"] = torch.cuda.get_device_name(0)
    except Exception as err:  # noqa: BLE001 - torch is optional
        info["torch"] = f"torch not available: {type(err).__name__}: {err}"
    part.save()
    print(json.dumps(info, indent=1, default=str))
    if not info["probe_ok"]:
        raise SystemExit(3)


# -- check -------------------------------------------------------------------------
def model_sizes(module, I, H, O):
    """The first size name is the input, the last the output, those between hidden:
    H, H+1, ... (so that two hidden sizes never coincide and a swap cannot hide)."""
    names = module.SIZES
    return dict(zip(names, [I] + [H + j for j in range(len(names) - 2)] + [O]))


def make_problem(module, sizes, T, B, seed):
    """float64 values that are exact in float32: weights +-1/sqrt(fan-in), nonzero
    biases, x ~ N(0, 1), state0 ~ N(0, 0.5), mask in [0.5, 1.5] with a zero."""
    import numpy as np

    rng = np.random.default_rng(seed)
    spec = module.SPEC
    params = {}
    for name, shape in spec["params"].items():
        dims = [sizes[s] for s in shape]
        fan = dims[-1] if len(dims) == 2 else dims[0]
        params[name] = rng.uniform(-1, 1, dims) / math.sqrt(fan)
    x = rng.standard_normal((T, B, sum(sizes[s] for _, s in spec["inputs"])))
    O = sizes[spec["output"][1]]
    if spec["target"] == "index":
        targets = rng.integers(0, O, (T, B))
    else:
        targets = rng.uniform(0, 1, (T, B, O))
    state0 = {name: 0.5 * rng.standard_normal((B, sizes[s])) for name, s in spec["states"].items()}
    mask = rng.uniform(0.5, 1.5, (T, B))
    mask[min(1, T - 1), 0] = 0.0

    def f32(a):
        return a.astype(np.float32).astype(np.float64) if a.dtype.kind == "f" else a

    return ({k: f32(v) for k, v in params.items()}, f32(x), f32(targets),
            {k: f32(v) for k, v in state0.items()}, mask)


def _cast(obj, dtype):
    """Arrays (or a dict of them) as dtype; integer arrays (targets) unchanged."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj.astype(dtype) if obj.dtype.kind == "f" else obj


def rel_err(a, ref):
    """max |a - ref| / max |ref| (bench/frameworks.py's measure for one array)."""
    import numpy as np

    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    if ref.size == 0:
        return 0.0
    return float(np.max(np.abs(a - ref))) / max(float(np.max(np.abs(ref))), 1e-30)


def compare(result, ref, dtype):
    """Errors of (loss, grads) against the reference (loss, grads)."""
    import numpy as np

    from bpttgen.codegen.runtime.gradcheck import max_relative_error

    (l1, g1), (l0, g0) = result, ref
    per = {k: rel_err(g1[k], g0[k]) for k in g0}
    # The worst array; a NaN counts as the worst of all.
    worst = max(per, key=lambda k: (per[k] != per[k], per[k] if per[k] == per[k] else 0.0),
                default=None)
    bad = [k for k in g0 if not isinstance(g1.get(k), np.ndarray)
           or g1[k].shape != g0[k].shape or g1[k].dtype != np.dtype(dtype)]
    return {"loss_err": abs(l1 - l0) / max(abs(l0), 1e-30),
            "grad_err": per[worst] if worst else 0.0, "worst": worst,
            "grad_err_elem": max((max_relative_error(g1[k], g0[k]) for k in g0), default=0.0),
            "bad_arrays": bad}


def judge(row):
    tol = TOL[row["dtype"]]
    ok = not row.get("bad_arrays") and "error" not in row
    for key, t in (("loss_err", tol["loss"]), ("grad_err", tol["grads"]),
                   ("grad_err_elem", tol["elem"])):
        if t is not None and key in row:
            v = row[key]
            ok = ok and v == v and v <= t  # NaN fails
    row["tol"] = tol
    row["ok"] = bool(ok)
    return row


def worker_check(args, part):
    import numpy as np
    from numba import cuda

    from bpttgen.codegen.runtime import cuda as crt

    model = args.model
    sim = _is_simulator()
    if sim:
        _simulator_setup()
    cpu = importlib.import_module(f"bpttgen.generated.{model}")
    gpu = importlib.import_module(f"bpttgen.generated.{model}_cuda")
    algorithms = tuple(gpu.ALGORITHMS)
    part.data["algorithms"] = list(algorithms)
    base_launch = dict(tile=crt.TILE, block=crt.BLOCK, chunks=crt.CHUNKS,
                       move_grid=crt.MOVE_GRID)
    part.data["launch"] = base_launch
    cpu_f32 = args.cpu_f32 == "all" or (args.cpu_f32 == "time" and model in TIMED)

    plan = [("tiny", TINY)]
    if not args.quick:
        plan.append(("ragged", RAGGED))
    plan += [("bench", tuple(s)) for s in args.sizes_list]
    # Device arrays, repeatability and other launch sizes: at the ragged size (the
    # tiny one in a --quick run).
    paths_at = "tiny" if args.quick else "ragged"

    def row_base(label, size, dtype, case):
        return {"model": model, "label": label, "size": list(size), "dtype": dtype,
                "case": case}

    def emit(row):
        judge(row)
        part.add(row)
        extra = f" (CPU float32: {row['cpu_f32_err']:.1e})" if "cpu_f32_err" in row else ""
        err = row.get("error", "").strip().splitlines()[-1:] or [""]
        print(f"{row['label']:<6} {str(tuple(row['size'])):<24} {row['dtype']:<7} "
              f"{row['case']:<22} loss {row.get('loss_err', float('nan')):.1e} "
              f"grads {row.get('grad_err', float('nan')):.1e}{extra} "
              f"{'ok' if row['ok'] else 'FAILED ' + err[0][:200]}", flush=True)

    for seed, (label, (B, T, I, H, O)) in enumerate(plan):
        sizes = model_sizes(gpu, I, H, O)
        p64, x64, tg, s64, mask = make_problem(gpu, sizes, T, B, seed=seed)
        small = label in ("tiny", "ragged")
        # The cases: (name, keyword arguments of loss_and_grads, or None for forward).
        cases = []
        if small:
            cases.append(("bptt+state0+mask+l2", dict(state0=s64, mask=mask, l2=0.05)))
            for algo in algorithms:
                if algo == "bptt":
                    continue
                if algo == "naive" and label != "tiny":
                    continue  # O(T^2) launches: tiny only
                kw = dict(state0=s64, algorithm=algo)
                if algo == "tbptt":
                    kw.update(k1=2, k2=3) if label == "tiny" else kw.update(k1=3, k2=4)
                cases.append((algo, kw))
            cases.append(("forward+state0", None))
        else:
            cases.append(("bptt", {}))
            if "tbptt" in algorithms:
                cases.append(("tbptt", dict(algorithm="tbptt", k1=min(16, T), k2=min(32, T))))
            cases.append(("forward", None))
        for case, kw in cases:
            try:
                if kw is None:
                    kwf = dict(state0=s64) if small else {}
                    y0, f0 = cpu.forward(p64, x64, **kwf)
                else:
                    ref = cpu.loss_and_grads(p64, x64, tg, **kw)
            except Exception:  # noqa: BLE001 - reported per row
                for dtype in args.dtypes:
                    emit(dict(row_base(label, (B, T, I, H, O), dtype, case),
                              error="CPU reference failed:\n" + traceback.format_exc()))
                continue
            for dtype in args.dtypes:
                row = row_base(label, (B, T, I, H, O), dtype, case)
                dt = np.dtype(dtype)
                try:
                    t = time.perf_counter()
                    if kw is None:
                        kwd = _cast(kwf, dt)
                        y1, f1 = gpu.forward(_cast(p64, dt), _cast(x64, dt), **kwd)
                        row["gpu_s"] = time.perf_counter() - t
                        errs = [rel_err(y1, y0)] + [rel_err(f1[k], f0[k]) for k in f0]
                        row.update(loss_err=0.0, grad_err=max(errs),
                                   worst="y" if errs[0] == max(errs) else "final state",
                                   bad_arrays=[] if y1.dtype == dt else ["y dtype"])
                        if dt == np.float32 and cpu_f32 and label == "bench":
                            yc, fc = cpu.forward(_cast(p64, dt), _cast(x64, dt), **kwd)
                            row["cpu_f32_err"] = max([rel_err(yc, y0)] +
                                                     [rel_err(fc[k], f0[k]) for k in f0])
                    else:
                        kwd = {k: _cast(v, dt) if k in ("state0", "mask") else v
                               for k, v in kw.items()}
                        res = gpu.loss_and_grads(_cast(p64, dt), _cast(x64, dt), tg, **kwd)
                        row["gpu_s"] = time.perf_counter() - t
                        row.update(compare(res, ref, dtype))
                        if (dt == np.float32 and cpu_f32 and case in ("bptt",)
                                and label == "bench"):
                            rc = cpu.loss_and_grads(_cast(p64, dt), _cast(x64, dt), tg, **kwd)
                            c = compare(rc, ref, dtype)
                            row["cpu_f32_err"] = max(c["grad_err"], c["loss_err"])
                except Exception:  # noqa: BLE001 - reported per row
                    row["error"] = traceback.format_exc()
                emit(row)
        if label == paths_at:
            _check_device_paths(args, emit, row_base, label, cpu, gpu, crt, cuda, np,
                                (B, T, I, H, O), p64, x64, tg, s64, base_launch, sim)


def _check_device_paths(args, emit, row_base, label, cpu, gpu, crt, cuda, np, size, p64,
                        x64, tg, s64, base_launch, sim):
    """Device arrays in and out give the NumPy path's bits; two runs give the same
    bits; other launch sizes give the CPU's result."""
    for dtype in args.dtypes:
        dt = np.dtype(dtype)
        row = row_base(label, size, dtype, "device-arrays+repeat")
        try:
            p, x, s = _cast(p64, dt), _cast(x64, dt), _cast(s64, dt)
            l1, g1 = gpu.loss_and_grads(p, x, tg, state0=s)
            l2, g2 = gpu.loss_and_grads(p, x, tg, state0=s)
            dev = {k: cuda.to_device(v) for k, v in p.items()}
            l3, g3 = gpu.loss_and_grads(dev, cuda.to_device(x), cuda.to_device(tg),
                                        state0={k: cuda.to_device(v) for k, v in s.items()})
            on_device = all(crt.is_device_array(g) for g in g3.values())
            g3 = {k: g.copy_to_host() for k, g in g3.items()}
            same_twice = l1 == l2 and all(np.array_equal(g1[k], g2[k]) for k in g1)
            same_device = l1 == l3 and all(np.array_equal(g1[k], g3[k]) for k in g1)
            ref = cpu.loss_and_grads(p64, x64, tg, state0=s64)
            row.update(compare((l3, g3), ref, dtype))
            row.update(identical_twice=same_twice, identical_device_numpy=same_device,
                       grads_on_device=on_device)
            if not (same_twice and same_device and on_device):
                row["bad_arrays"] = row["bad_arrays"] + [
                    w for w, bad in (("not deterministic", not same_twice),
                                     ("device path differs from NumPy path", not same_device),
                                     ("gradients not device arrays", not on_device)) if bad]
        except Exception:  # noqa: BLE001
            row["error"] = traceback.format_exc()
        emit(row)
    if sim or args.quick:
        return
    ref = cpu.loss_and_grads(p64, x64, tg, state0=s64)
    for name, launch in LAUNCHES.items():
        for dtype in args.dtypes:
            dt = np.dtype(dtype)
            row = row_base(label, size, dtype, f"bptt@{name}")
            try:
                crt.configure(**launch)
                res = gpu.loss_and_grads(_cast(p64, dt), _cast(x64, dt), tg,
                                         state0=_cast(s64, dt))
                row.update(compare(res, ref, dtype))
            except Exception:  # noqa: BLE001
                row["error"] = traceback.format_exc()
            finally:
                crt.configure(**base_launch)
            emit(row)


# -- time ----------------------------------------------------------------------------
def torch_gpu_runner(torch, np, model, params, x, targets, tf32):
    """torch.nn.RNN/LSTM/GRU on the GPU (cuDNN) with bpttgen's parameters (stacked as
    bench/frameworks.py stacks them), a Linear readout and mean softmax cross-entropy:
    run() does forward + loss + backward and synchronises."""
    import torch.nn.functional as F

    dev = torch.device("cuda")
    T, B, I = x.shape
    st = fw.to_stacked(np, model, params)
    H, G = st["W_hh"].shape[1], fw.GATES[model]
    rnn = {"elman": lambda: torch.nn.RNN(I, H, nonlinearity="tanh"),
           "lstm": lambda: torch.nn.LSTM(I, H), "gru": lambda: torch.nn.GRU(I, H)}[model]()
    rnn = rnn.to(dev)
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.from_numpy(st["W_ih"]))
        rnn.weight_hh_l0.copy_(torch.from_numpy(st["W_hh"]))
        rnn.bias_ih_l0.copy_(torch.from_numpy(st["b_ih"]))
        rnn.bias_hh_l0.copy_(torch.from_numpy(st["b_hh"]) if "b_hh" in st
                             else torch.zeros(G * H))
    W_y = torch.tensor(st["W_y"], device=dev, requires_grad=True)
    b_y = torch.tensor(st["b_y"], device=dev, requires_grad=True)
    leaves = {"W_ih": rnn.weight_ih_l0, "W_hh": rnn.weight_hh_l0, "b_ih": rnn.bias_ih_l0,
              "b_hh": rnn.bias_hh_l0, "W_y": W_y, "b_y": b_y}
    xt = torch.from_numpy(x).to(dev)
    tg = torch.from_numpy(targets).reshape(-1).to(dev)
    last = {}

    def run():
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for p in leaves.values():
            p.grad = None
        z = rnn(xt)[0] @ W_y.T + b_y
        loss = F.cross_entropy(z.reshape(T * B, -1), tg)
        loss.backward()
        torch.cuda.synchronize()
        last["loss"] = loss

    def grads():
        g = {k: p.grad.detach().cpu().numpy() for k, p in leaves.items()
             if k != "b_hh" or "b_hh" in st}
        return float(last["loss"].detach()), fw.from_stacked(np, model, g, H)

    return run, grads


def _threads():
    import numba

    out = {"cpu_count": os.cpu_count(), "numba_threads": numba.get_num_threads(),
           "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                               "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
                   if k in os.environ}}
    if hasattr(os, "sched_getaffinity"):
        out["affinity"] = len(os.sched_getaffinity(0))
    try:
        import threadpoolctl

        out["blas"] = [{k: p.get(k) for k in ("internal_api", "num_threads", "version")}
                       for p in threadpoolctl.threadpool_info()]
    except Exception as err:  # noqa: BLE001 - informative only
        out["blas"] = f"threadpoolctl not available: {err}"
    return out


def worker_gemm(args, part):
    import numpy as np
    from numba import cuda

    from bpttgen.codegen.runtime import cuda as crt

    sim = _is_simulator()
    if sim:
        _simulator_setup()
        bc.REPEATS.update(repeats=1, min_time=0.0)
    n = 8 if sim else args.gemm_n
    ours, cublas = bc.gemm_rates(np, cuda, crt, n, np.float32, cuda.synchronize)
    part.data.update(n=n, tiled_gflops=ours, cublas_gflops=cublas)
    part.save()
    print(f"float32 GEMM {n}^3: the modules' tiled kernel {ours:.0f} GFLOP/s; cuBLAS (CuPy) "
          + (f"{cublas:.0f} GFLOP/s" if cublas else "n/a"))


def worker_time(args, part):
    import numpy as np
    from numba import cuda

    model = args.model
    sim = _is_simulator()
    if sim:
        _simulator_setup()
    cpu = importlib.import_module(f"bpttgen.generated.{model}")
    gpu = importlib.import_module(f"bpttgen.generated.{model}_cuda")
    torch, why = None, None
    try:
        import torch

        if not torch.cuda.is_available():
            torch, why = None, "torch.cuda.is_available() is False"
    except Exception as err:  # noqa: BLE001 - torch is optional
        torch, why = None, f"{type(err).__name__}: {err}"
    part.data["torch"] = ("torch not available: " + why) if torch is None else {
        "version": torch.__version__, "cudnn": torch.backends.cudnn.version(),
        "cudnn_enabled": bool(torch.backends.cudnn.enabled)}
    part.data["threads"] = _threads()
    part.save()
    sync = cuda.synchronize
    for (B, T, I, H, O) in args.sizes_list:
        params, x, targets = fw.problem(np, cpu, model, B, T, I, H, O, np.float32)
        dev = ({k: cuda.to_device(v) for k, v in params.items()}, cuda.to_device(x),
               cuda.to_device(targets))
        sync()
        last = {}

        def cuda_device():
            last["dev"] = gpu.loss_and_grads(*dev)
            sync()

        def cuda_numpy():
            last["np"] = gpu.loss_and_grads(params, x, targets)

        def cpu_module():
            last["cpu"] = cpu.loss_and_grads(params, x, targets)

        runners = {"cuda-device": cuda_device, "cuda-numpy": cuda_numpy, "cpu": cpu_module}
        grads_of = {"cuda-numpy": lambda: last["np"], "cpu": lambda: last["cpu"],
                    "cuda-device": lambda: (last["dev"][0], {k: g.copy_to_host() for k, g
                                                             in last["dev"][1].items()})}
        if torch is not None:
            for name, tf32 in (("torch-cudnn", False), ("torch-cudnn-tf32", True)):
                try:
                    run, grads = torch_gpu_runner(torch, np, model, params, x, targets, tf32)
                    runners[name], grads_of[name] = run, grads
                except Exception:  # noqa: BLE001 - reported, the others go on
                    part.data.setdefault("errors", []).append(traceback.format_exc())
        first, errors = {}, {}
        for name, run in list(runners.items()):
            try:
                t = time.perf_counter()
                run()
                first[name] = time.perf_counter() - t
            except Exception:  # noqa: BLE001
                part.data.setdefault("errors", []).append(f"{name} {(B, T, I, H, O)}:\n"
                                                          + traceback.format_exc())
                del runners[name]
        ref = grads_of["cpu"]() if "cpu" in runners else None
        for name in runners:
            try:
                loss, g = grads_of[name]()
                errors[name] = max(fw.max_error(np, g, ref[1]),
                                   abs(loss - ref[0]) / abs(ref[0]))
            except Exception:  # noqa: BLE001 - no CPU reference, or no gradients
                errors[name] = float("nan")
                part.data.setdefault("errors", []).append(f"{name} gradients:\n"
                                                          + traceback.format_exc())
        for _ in range(2):  # warm-up
            for run in runners.values():
                run()
        rounds, min_time = (2, 0.0) if args.quick else (args.rounds, args.min_time)
        times = fw.timed_rounds(runners, rounds, 200, min_time, pause=0.01, block=0.0)
        ms = {n: 1e3 * sorted(v)[len(v) // 2] for n, v in times.items()}
        flops = fw.flops(model, B, T, I, H, O)
        for name in runners:
            row = {"model": model, "size": [B, T, I, H, O], "framework": name,
                   "ms": ms[name], "min_ms": 1e3 * min(times[name]),
                   "first_ms": 1e3 * first[name], "rounds": len(times[name]),
                   "gflops": flops / (ms[name] * 1e-3) / 1e9,
                   "x_cuda_device": ms[name] / ms.get("cuda-device", float("nan")),
                   "err_vs_cpu_f32": errors[name],
                   "err_ok": errors[name] <= fw.TOLERANCE_F32 or name.endswith("tf32")}
            part.data["rows"].append(row)
        part.save()
        print(f"{model} {(B, T, I, H, O)}: " + ", ".join(
            f"{n} {ms[n]:.2f} ms (first {1e3 * first[n]:.0f} ms, err {errors[n]:.1e})"
            for n in runners), flush=True)


# ======================================================================================
# the orchestrator
# ======================================================================================
class Run:
    """The JSON document of a run, written after every change."""

    def __init__(self, path, fresh):
        self.path = path
        self.doc = {}
        if not fresh and os.path.exists(path):
            try:
                with open(path) as f:
                    self.doc = json.load(f)
            except (OSError, ValueError):
                self.doc = {}
        self.doc.setdefault("schema", "bpttgen-cuda-device/1")
        self.doc.setdefault("started", datetime.datetime.now().isoformat(timespec="seconds"))
        self.doc.setdefault("commands", []).append(" ".join(sys.argv))
        self.doc["source"] = fw.source_version()
        self.doc["machine"] = fw.machine()
        self.doc["tolerances"] = TOL
        self.lock = threading.RLock()  # re-entrant: the SIGTERM handler saves too
        self.save()

    def save(self):
        with self.lock:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.doc, f, indent=1, default=str)
            os.replace(tmp, self.path)


class Worker:
    """One worker subprocess: its output echoed with a prefix, its last lines kept."""

    def __init__(self, stage, model, args, env_extra):
        self.stage, self.model = stage, model
        self.name = f"{stage}:{model}" if model else stage
        os.makedirs(PARTS, exist_ok=True)
        self.part = os.path.join(PARTS, f"{stage}_{model or 'all'}_{os.getpid()}.json")
        if os.path.exists(self.part):
            os.remove(self.part)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", stage,
               "--part", self.part, "--dtypes", ",".join(args.dtypes),
               "--rounds", str(args.rounds), "--min-time", str(args.min_time),
               "--cpu-f32", args.cpu_f32, "--gemm-n", str(args.gemm_n),
               "--sizes", *[",".join(map(str, s)) for s in args.sizes_list]]
        if model:
            cmd += ["--model", model]
        if args.quick:
            cmd.append("--quick")
        # Tiny launches are the point of the ragged checks: no occupancy warnings.
        env = dict(os.environ, PYTHONUNBUFFERED="1", NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS="0",
                   **env_extra)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        self.start = time.perf_counter()
        self.tail = []
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.reader = threading.Thread(target=self._echo, daemon=True)
        self.reader.start()

    def _echo(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.tail = (self.tail + [line])[-40:]
            print(f"[{self.name}] {line}", flush=True)

    def finish(self, deadline):
        """Wait until the deadline (perf_counter), then kill. Returns the status."""
        status = "ok"
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            status = "timeout"
        self.reader.join(timeout=5)
        if status == "ok" and self.proc.returncode != 0:
            status = f"exit {self.proc.returncode}"
        part = {}
        if os.path.exists(self.part):
            try:
                with open(self.part) as f:
                    part = json.load(f)
            except (OSError, ValueError):
                pass
        meta = {"status": status, "seconds": round(time.perf_counter() - self.start, 1)}
        if status != "ok":
            meta["tail"] = self.tail[-25:]
        return part, meta

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()


WORKERS = []


def _cache_env(name):
    """Each worker its own Numba cache folder (kept between runs on one machine)."""
    base = os.environ.get("BPTTGEN_CUDA_DEVICE_CACHE",
                          os.path.join(os.environ.get("TMPDIR", "/tmp"), "bpttgen-nbcache"))
    return {"NUMBA_CACHE_DIR": os.path.join(base, name)}


def stage_probe(args, run, deadline):
    w = Worker("probe", None, args, _cache_env("probe"))
    WORKERS.append(w)
    part, meta = w.finish(deadline)
    run.doc["probe"] = dict(part.get("info", {}), worker=meta)
    run.save()
    ok = meta["status"] == "ok" and run.doc["probe"].get("probe_ok")
    if not ok:
        print(f"probe FAILED ({meta['status']}): the GPU cannot run the modules; see "
              f"{run.path}", flush=True)
    return bool(ok)


def stage_check(args, run, deadline):
    models = args.models_list
    jobs = max(1, min(args.jobs, len(models)))
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    thread_env = {k: threads for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                       "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    check = run.doc.setdefault("check", {})
    check.update(tolerances=TOL, threads_per_worker=int(threads), jobs=jobs)
    check.setdefault("workers", {})
    rows = check.setdefault("rows", [])
    # Slowest to compile first (two layers, then the LSTM and GRU).
    order = sorted(models, key=lambda m: ("2" not in m, m not in ("lstm", "gru", "deep"), m))
    pending, running = list(order), []
    while pending or running:
        while pending and len(running) < jobs:
            m = pending.pop(0)
            running.append(Worker("check", m, args, dict(thread_env, **_cache_env(m))))
            WORKERS.append(running[-1])
        time.sleep(0.2)
        for w in list(running):
            if w.proc.poll() is not None or time.perf_counter() > deadline:
                part, meta = w.finish(deadline)
                running.remove(w)
                with run.lock:
                    rows[:] = [r for r in rows if r["model"] != w.model] + part.get("rows", [])
                    check["workers"][w.model] = dict(meta, algorithms=part.get("algorithms"),
                                                     launch=part.get("launch"))
                run.save()
                n = len(part.get("rows", []))
                bad = sum(not r["ok"] for r in part.get("rows", []))
                print(f"check {w.model}: {meta['status']}, {n} comparisons, {bad} failed, "
                      f"{meta['seconds']} s", flush=True)
    return all(w["status"] == "ok" for w in check["workers"].values()) and \
        all(r["ok"] for r in rows)


def stage_time(args, run, deadline):
    t = run.doc.setdefault("time", {})
    t.setdefault("workers", {})
    rows = t.setdefault("rows", [])
    ok = True
    if args.gemm_n:
        w = Worker("gemm", None, args, _cache_env("gemm"))
        WORKERS.append(w)
        part, meta = w.finish(min(deadline, time.perf_counter() + 60))
        run.doc["gemm"] = dict(part, worker=meta)
        run.save()
    models = [m for m in args.models_list if m in TIMED] or list(TIMED)
    for i, m in enumerate(models):
        left = deadline - time.perf_counter()
        if left < 10:
            t["workers"][m] = {"status": "skipped: out of time"}
            ok = False
            continue
        share = max(30.0, 1.5 * left / (len(models) - i))
        w = Worker("time", m, args, _cache_env(m))  # the check worker's cache: CPU compiled
        WORKERS.append(w)
        part, meta = w.finish(min(deadline, time.perf_counter() + share))
        rows[:] = [r for r in rows if r["model"] != m] + part.get("rows", [])
        t["workers"][m] = dict(meta, torch=part.get("torch"), threads=part.get("threads"),
                               errors=part.get("errors"))
        run.save()
        ok = ok and meta["status"] == "ok" and all(r["err_ok"] for r in part.get("rows", []))
    return ok


def junit_summary(path):
    """Counts and failures of a pytest --junitxml file."""
    import xml.etree.ElementTree as ET

    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": []}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        return dict(out, error=f"no readable junit file: {err}")
    suites = [root] if root.tag == "testsuite" else list(root)
    for key in ("tests", "failures", "errors", "skipped"):
        out[key] = sum(int(s.get(key, 0)) for s in suites)
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            out["failed"].append({"test": f"{case.get('name')}",
                                  "message": (bad.get("message") or "")[:500]})
    return out


#: Relative cost of a test-worker case group (one module's compiles each), for
#: spreading the groups over the pytest processes.
TEST_WEIGHT = {"lstm2": 3, "user": 3, "deep": 2, "lstm": 2, "gru": 2, "elman": 2}


class TestRun:
    """tests/test_cuda.py on the GPU (BPTTGEN_CUDA_REAL=1; under the simulator when
    this run is), split by node id into parallel pytest processes: one for the PTX
    tests, and --test-jobs that each start the test worker over a share of its
    cases (all cases of one model in one process, so that each model compiles
    once), each with its own Numba cache folder. Output to --tests-log."""

    def __init__(self, args, run, deadline):
        self.run, self.deadline, self.procs = run, deadline, []
        self.log_path = args.tests_log or os.path.join(os.path.dirname(os.path.abspath(run.path)),
                                                       "test_cuda.log")
        sim = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
        try:
            ids = _load("bpttgen_cuda_sim_worker_ids",
                        os.path.join(ROOT, "tests", "cuda_sim_worker.py")).case_ids()
        except Exception:  # noqa: BLE001 - then one pytest process runs the whole file
            print("could not list the test worker's cases: one pytest process\n"
                  + traceback.format_exc(), flush=True)
            ids = None
        if ids is not None and args.test_cases:
            ids = [i for i in ids if i in args.test_cases.split(",")]
        file = "tests/test_cuda.py"
        groups = []
        if ids is None:
            groups.append(("all", [file]))
        else:
            by_model = {}
            for case in ids:
                by_model.setdefault(case.split(":")[0], []).append(case)
            jobs = max(1, min(args.test_jobs, len(by_model)))
            bins = [[0, []] for _ in range(jobs)]
            for model in sorted(by_model, key=lambda m: -TEST_WEIGHT.get(m, 1)):
                b = min(bins, key=lambda b: b[0])
                b[0] += TEST_WEIGHT.get(model, 1)
                b[1] += by_model[model]
            groups.append(("ptx", [file, "-k", "ptx or listed or benchmark"]))
            for i, (_, cases) in enumerate(b for b in bins if b[1]):
                groups.append((f"gpu{i}", [f"{file}::test_simulator_matches_cpu[{c}]"
                                           for c in cases]
                               + [f"{file}::test_simulator_run_ends_cleanly"]))
        threads = str(max(1, (os.cpu_count() or 1) // (len(groups) + args.jobs)))
        base = os.environ.get("BPTTGEN_CUDA_DEVICE_CACHE",
                              os.path.join(os.environ.get("TMPDIR", "/tmp"), "bpttgen-nbcache"))
        os.makedirs(PARTS, exist_ok=True)
        self.log = open(self.log_path, "w")
        for name, selection in groups:
            env = dict(os.environ, PYTHONUNBUFFERED="1",
                       NUMBA_CACHE_DIR=os.path.join(base, "tests-" + name),
                       **{k: threads for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                               "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")})
            env.pop("NUMBA_ENABLE_CUDASIM", None)  # the test file chooses for its worker
            if not sim:
                env["BPTTGEN_CUDA_REAL"] = "1"
            env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
            xml = os.path.join(PARTS, f"junit_{name}_{os.getpid()}.xml")
            log = os.path.join(PARTS, f"pytest_{name}_{os.getpid()}.log")
            cmd = [sys.executable, "-m", "pytest", *selection, "-o", "addopts=", "-q", "-rfE",
                   "-p", "no:cacheprovider", "--durations=8", f"--junitxml={xml}"]
            with open(log, "w") as f:
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f,
                                        stderr=subprocess.STDOUT)
            entry = dict(name=name, proc=proc, xml=xml, log=log, start=time.perf_counter(),
                         command=("BPTTGEN_CUDA_REAL=1 " if not sim else "")
                         + "python " + shlex.join(cmd[1:]))
            self.procs.append(entry)
            threading.Thread(target=self._note_end, args=(entry,), daemon=True).start()
        WORKERS.append(self)
        print(f"tests/test_cuda.py: {len(self.procs)} pytest processes started "
              f"({', '.join(p['name'] for p in self.procs)}; "
              f"{'simulator' if sim else 'real GPU'}); log {self.log_path}", flush=True)

    @staticmethod
    def _note_end(entry):
        entry["proc"].wait()
        entry.setdefault("end", time.perf_counter())

    def kill(self):
        for p in self.procs:
            if p["proc"].poll() is None:
                p["proc"].kill()

    def finish(self):
        groups, ok = [], True
        while any(p["proc"].poll() is None for p in self.procs) and \
                time.perf_counter() < self.deadline:
            time.sleep(0.2)
        for p in self.procs:
            status = "ok"
            if p["proc"].poll() is None:
                p["proc"].kill()
                status = "timeout"
            p["proc"].wait()
            p.setdefault("end", time.perf_counter())
            rc = p["proc"].returncode
            summary = junit_summary(p["xml"])
            with open(p["log"]) as f:
                text = f.read()
            self.log.write(f"===== {p['name']}: {p['command']}\n{text}\n")
            self.log.flush()
            last = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
            groups.append(dict(name=p["name"], status=status, exit=rc,
                               seconds=round(p["end"] - p["start"], 1),
                               command=p["command"], last_line=last[0], **summary))
            ok = ok and status == "ok" and rc == 0
            print(f"pytest {p['name']}: {status}, exit {rc}: {last[0]}", flush=True)
        self.log.close()
        tests = {"log": os.path.basename(self.log_path), "groups": groups, "ok": ok}
        for key in ("tests", "failures", "errors", "skipped"):
            tests[key] = sum(g.get(key, 0) for g in groups)
        tests["failed"] = [f for g in groups for f in g["failed"]]
        self.run.doc["tests"] = tests
        self.run.save()
        return ok


# -- the tables at the end ---------------------------------------------------------------
def _fmt(v):
    return "-" if v is None else ("nan" if v != v else f"{v:.1e}")


def print_tables(doc):
    p = doc.get("probe", {})
    if p:
        print("\n## GPU: " + str(p.get("device")) + f", cc {p.get('compute_capability')}, driver "
              f"CUDA {p.get('driver_cuda_version')}, runtime {p.get('runtime_cuda_version')}, "
              f"NVVM {p.get('nvvm_version')}; numba-cuda "
              f"{p.get('versions', {}).get('numba-cuda')}, numba "
              f"{p.get('versions', {}).get('numba')}; torch {p.get('torch')}")
    check = doc.get("check")
    if check:
        print("\n## check: CUDA module vs CPU module (float64: to the CPU's float64; float32: "
              "to the CPU's float64 on the same inputs)\n")
        print(f"{'model':<14} {'dtype':<8} {'label':<7} {'cases':>5} {'loss err':>9} "
              f"{'grad err':>9} {'elem err':>9} {'CPU f32':>8} {'tol':>6}  result")
        rows = check.get("rows", [])
        keys = dict.fromkeys((r["model"], r["dtype"], r["label"]) for r in rows)
        rank = {"tiny": 0, "ragged": 1, "bench": 2}
        for model, dtype, label in sorted(keys, key=lambda k: (
                MODELS.index(k[0]) if k[0] in MODELS else 99, k[1], rank.get(k[2], 3))):
            sel = [r for r in rows if (r["model"], r["dtype"], r["label"]) == (model, dtype, label)]

            def worst(key):
                vals = [r[key] for r in sel if key in r]
                return None if not vals else max(vals, key=lambda v: math.inf if v != v else v)

            bad = [r for r in sel if not r["ok"]]
            print(f"{model:<14} {dtype:<8} {label:<7} {len(sel):>5} {_fmt(worst('loss_err')):>9} "
                  f"{_fmt(worst('grad_err')):>9} {_fmt(worst('grad_err_elem')):>9} "
                  f"{_fmt(worst('cpu_f32_err')):>8} {TOL[dtype]['grads']:>6.0e}  "
                  + ("ok" if not bad else f"{len(bad)} FAILED"))
        for model, meta in check.get("workers", {}).items():
            if meta.get("status") != "ok":
                print(f"  worker {model}: {meta.get('status')}; last lines:\n    "
                      + "\n    ".join(meta.get("tail", [])[-8:]))
        failed = [r for r in rows if not r["ok"]]
        for r in failed[:30]:
            why = (r.get("error") or "").strip().splitlines()[-1:] or [""]
            print(f"  FAILED {r['model']} {r['dtype']} {r['label']} {tuple(r['size'])} "
                  f"{r['case']}: loss {_fmt(r.get('loss_err'))} grads {_fmt(r.get('grad_err'))} "
                  f"({r.get('worst')}) {r.get('bad_arrays') or ''} {why[0][:300]}")
        total = len(rows)
        print(f"\n{total - len(failed)} of {total} comparisons within tolerance")
    g = doc.get("gemm")
    if g and "tiled_gflops" in g:
        print(f"\nfloat32 GEMM {g['n']}^3: tiled kernel {g['tiled_gflops']:.0f} GFLOP/s, cuBLAS "
              + (f"{g['cublas_gflops']:.0f} GFLOP/s" if g.get("cublas_gflops") else "n/a"))
    t = doc.get("time")
    if t:
        rows = t.get("rows", [])
        fws = list(dict.fromkeys(r["framework"] for r in rows))
        print("\n## time: float32 loss + all gradients, ms per call (median); x = time / "
              "cuda-device time; first call in s"
              + (" (CUDA SIMULATOR: these times mean nothing)" if p.get("simulator") else "")
              + "\n")
        print(f"{'model':<6} {'(B,T,I,H,O)':<22} " + " ".join(f"{f:>17}" for f in fws)
              + "   first call s (" + ", ".join(fws) + ")")
        for model in dict.fromkeys(r["model"] for r in rows):
            for size in dict.fromkeys(tuple(r["size"]) for r in rows if r["model"] == model):
                sel = {r["framework"]: r for r in rows
                       if r["model"] == model and tuple(r["size"]) == size}
                cells = []
                for f in fws:
                    r = sel.get(f)
                    cells.append("-" if r is None else f"{r['ms']:.2f} ({r['x_cuda_device']:.2f}x)"
                                 + ("" if r["err_ok"] else "!"))
                print(f"{model:<6} {','.join(map(str, size)):<22} "
                      + " ".join(f"{c:>17}" for c in cells) + "   "
                      + ", ".join("-" if f not in sel else f"{sel[f]['first_ms'] / 1e3:.1f}"
                                  for f in fws))
        for model, meta in t.get("workers", {}).items():
            if meta.get("status") != "ok":
                print(f"  worker {model}: {meta.get('status')}; last lines:\n    "
                      + "\n    ".join(meta.get("tail", [])[-8:]))
            for err in meta.get("errors") or []:
                print(f"  {model}: " + err.strip().splitlines()[0] + " ... "
                      + err.strip().splitlines()[-1][:200])
        threads = next((m["threads"] for m in t.get("workers", {}).values()
                        if m.get("threads")), None)
        if threads:
            blas = threads.get("blas")
            blas = ", ".join(f"{b.get('internal_api')} {b.get('num_threads')} threads"
                             for b in blas) if isinstance(blas, list) else blas
            print(f"\nCPU module: {threads.get('cpu_count')} cores ({threads.get('affinity')} "
                  f"usable), Numba {threads.get('numba_threads')} threads (the generated "
                  f"kernels are serial loops), BLAS: {blas}")
        torch_info = next((m["torch"] for m in t.get("workers", {}).values()
                           if m.get("torch")), None)
        if torch_info:
            print(f"torch: {torch_info}")
        if rows:
            print("\n(! : gradients differ from the CPU module's float32 ones by more than "
                  f"{fw.TOLERANCE_F32:g}; cuda-numpy includes the copies in and out; cpu: "
                  "generated/<model>.py on this machine's cores; torch-cudnn: TF32 off, "
                  "torch-cudnn-tf32: torch's defaults)")
    tests = doc.get("tests")
    if tests:
        print(f"\n## tests/test_cuda.py: {tests.get('tests')} tests, "
              f"{tests.get('failures')} failures, {tests.get('errors')} errors, "
              f"{tests.get('skipped')} skipped ({tests.get('log')})")
        for g in tests.get("groups", []):
            print(f"  {g['name']:<5} {g['status']}, exit {g['exit']}, {g['seconds']} s: "
                  f"{g['last_line'][:150]}" + (f" [{g['error']}]" if "error" in g else ""))
        for f in tests.get("failed", [])[:20]:
            print(f"  FAILED {f['test']}: {f['message'][:200]}")


# ======================================================================================
def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT") or
                                                  os.path.join(HERE, "results"),
                                                  "cuda_device.json"),
                    help="the JSON file (default $OUT/cuda_device.json, or "
                         "bench/results/cuda_device.json where OUT is unset)")
    ap.add_argument("--stages", default="probe,check,tests,time",
                    help="comma-separated, of probe, check, tests, time (tests runs beside "
                         "check when both are named)")
    ap.add_argument("--fresh", action="store_true",
                    help="start a new JSON file (default: add to the one at --out)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sizes", nargs="*",
                    help="B,T,I,H,O each: timed sizes, and the 'bench' check sizes "
                         "(default: bench/frameworks.py's four; --quick: its two quick ones)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny check only plus --sizes, 2 timed rounds (a smoke run; the "
                         "only mode allowed under the simulator)")
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--jobs", type=int, default=min(len(MODELS), max(1, (os.cpu_count() or 2) // 2)),
                    help="check workers at once")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds at least")
    ap.add_argument("--min-time", type=float, default=1.0,
                    help="seconds of timed rounds per (model, size), at least")
    ap.add_argument("--cpu-f32", choices=("time", "all", "none"), default="time",
                    help="CPU float32 error as a yardstick for which models")
    ap.add_argument("--gemm-n", type=int, default=4096, help="GEMM rate at n^3 (0: skip)")
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds for all the stages of this call; workers past it are killed")
    ap.add_argument("--test-jobs", type=int, default=4,
                    help="pytest processes running the test worker's cases (tests stage)")
    ap.add_argument("--test-cases", help="only these test worker cases (comma-separated ids)")
    ap.add_argument("--tests-log", help="pytest output (default: test_cuda.log beside --out)")
    ap.add_argument("--no-tables", action="store_true", help="no tables at the end")
    ap.add_argument("--print", action="store_true", help="only print the tables of --out")
    # worker mode (internal)
    ap.add_argument("--worker", choices=("probe", "check", "time", "gemm"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.models_list = [m for m in args.models.split(",") if m]
    if args.sizes:
        args.sizes_list = [tuple(int(v) for v in s.split(",")) for s in args.sizes]
    else:
        args.sizes_list = list(fw.QUICK_SIZES if args.quick else fw.SIZES)
    return args


def main(argv=None):
    args = parse(argv)
    if args.worker:
        part = Part(args.part)
        part.save()
        {"probe": worker_probe, "check": worker_check, "time": worker_time,
         "gemm": worker_gemm}[args.worker](args, part)
        return 0
    if (os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" and not args.quick and not args.print
            and set(args.stages.split(",")) & {"check", "time"}):
        sys.stderr.write("bench/cuda_device.py: NUMBA_ENABLE_CUDASIM=1 selects the simulator: "
                         "use --quick and tiny --sizes (its times mean nothing)\n")
        return 2
    if args.print:
        with open(args.out) as f:
            print_tables(json.load(f))
        return 0
    run = Run(args.out, args.fresh)
    deadline = time.perf_counter() + args.budget

    def on_term(signum, frame):  # timeout(1) or Ctrl-C: keep what was measured
        for w in WORKERS:
            w.kill()
        run.doc.setdefault("interrupted", []).append(f"signal {signum}")
        run.save()
        print_tables(run.doc)
        os._exit(124)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - {"probe", "check", "tests", "time"}
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}")
    status = 0
    started = time.perf_counter()
    tests = None
    for stage in stages:
        t = time.perf_counter()
        print(f"\n# stage {stage} ({deadline - t:.0f} s of the budget left)", flush=True)
        if stage == "probe":
            if not stage_probe(args, run, min(deadline, t + 180)):
                print_tables(run.doc)
                return 3
        elif stage == "check":
            if "tests" in stages and tests is None:  # side by side: GPU and cores to spare
                tests = TestRun(args, run, deadline)
            status |= 0 if stage_check(args, run, deadline) else 1
        elif stage == "tests":
            tests = tests or TestRun(args, run, deadline)
            status |= 0 if tests.finish() else 1
        elif stage == "time":
            status |= 0 if stage_time(args, run, deadline) else 1
        run.doc.setdefault("stage_seconds", {})[stage] = round(time.perf_counter() - t, 1)
        run.save()
    if not args.no_tables:
        print_tables(run.doc)
    print(f"\n# {', '.join(stages)}: {time.perf_counter() - started:.0f} s; results in {run.path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
