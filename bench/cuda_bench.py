"""CUDA benchmark of generated modules: GFLOP/s against this GPU's own GEMM rate.

Prints, in one run on one GPU: the matrix-product rate of the tiled GEMM kernel the
modules use (codegen/cuda_runtime.py) at n^3, and of cuBLAS through CuPy where CuPy
is installed; then, per size, ms and GFLOP/s of loss_and_grads for the CUDA module
with every array already on the device, with NumPy arrays in and out (transfers
included), and for the CPU module at the same sizes.

    python bench/cuda_bench.py [--model elman] [--dtype float32] [--quick]

Needs a CUDA GPU and numba-cuda (pip install -e ".[cuda]"). Without a GPU it exits
with status 1 and says so; it refuses the CUDA simulator (its times mean nothing)
unless --smoke asks for a tiny run that only checks that the script works.
"""

import argparse
import importlib
import importlib.util
import os
import sys
import time

# This file's folder would shadow the "cuda" package (NVIDIA's cuda-python bindings,
# which numba-cuda imports) with this very script: take it off the path; put the
# repository root on it for codegen/ and generated/.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

SIZES = [(32, 128, 64, 128, 64), (64, 128, 256, 512, 256)]  # (B, T, I, H, O)
QUICK = [(32, 128, 64, 128, 64)]
SMOKE = [(3, 4, 5, 6, 3)]


def no_gpu(reason):
    sys.stderr.write(f"bench/cuda_bench.py: no CUDA GPU: {reason}. Nothing to measure; the "
                     "CUDA modules are verified without a GPU by tests/test_cuda.py "
                     "(PTX compilation and the CUDA simulator).\n")
    raise SystemExit(1)


def check_gpu(smoke):
    if importlib.util.find_spec("numba_cuda") is None:
        no_gpu('numba-cuda is not installed (pip install -e ".[cuda]")')
    simulator = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    if simulator and not smoke:
        no_gpu("NUMBA_ENABLE_CUDASIM=1 selects the simulator, whose timings mean nothing "
               "(use --smoke to check the script only)")
    from bpttgen.codegen.runtime.cuda import device_name

    name = device_name()
    if name is None:
        no_gpu("numba.cuda.is_available() is False (no device or no driver)")
    return name


REPEATS = dict(repeats=7, min_time=0.3)


def median_ms(fn, sync, repeats=None, min_time=None):
    repeats = REPEATS["repeats"] if repeats is None else repeats
    min_time = REPEATS["min_time"] if min_time is None else min_time
    fn()  # warm-up: compiles the kernels for these types
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
        if len(times) >= 100:
            break
    times.sort()
    return 1e3 * times[len(times) // 2]


def flops_bptt(module, sizes, T, B):
    """Matrix-product flops of one loss_and_grads: forward, adjoint of the source and
    weight gradient, 2*m*n*k each, over every weight matrix (elementwise work and
    reductions are not counted)."""
    total = 0
    for name, shape in module.PARAMS.items():
        if len(shape) == 2:
            rows, cols = (sizes[s] for s in shape)
            total += 3 * 2 * rows * cols * T * B
    return total


def gemm_rates(np, cuda, crt, n, dtype, sync):
    """GFLOP/s of C = A @ B.T at n^3: the modules' tiled kernel, and cuBLAS (CuPy)."""
    rng = np.random.default_rng(0)
    a = cuda.to_device(rng.standard_normal((n, n)).astype(dtype))
    b = cuda.to_device(rng.standard_normal((n, n)).astype(dtype))
    c = cuda.device_array((n, n), dtype)
    flops = 2 * n ** 3
    ours = flops / (median_ms(lambda: crt.gemm_nt(a, 0, b, c, 0, n, n, n), sync) * 1e-3) / 1e9
    try:
        import cupy
    except ImportError:
        return ours, None
    ca, cb = cupy.asarray(a), cupy.asarray(b)
    cublas = flops / (median_ms(lambda: ca @ cb.T, sync) * 1e-3) / 1e9
    return ours, cublas


def problem(np, module, sizes, T, B, dtype):
    rng = np.random.default_rng(0)
    params = module.init_params(sizes, dtype=dtype)
    x = rng.standard_normal((T, B, sum(sizes[s] for _, s in module.SPEC["inputs"]))).astype(dtype)
    O = sizes[module.SPEC["output"][1]]
    if module.SPEC["target"] == "index":
        targets = rng.integers(0, O, (T, B))
    else:
        targets = rng.random((T, B, O)).astype(dtype)
    return params, x, targets


def model_sizes(module, I, H, O):
    """I, H, O onto the model's size names: the first is the input, the last the
    output, every one between a hidden size."""
    names = module.SIZES
    return dict(zip(names, [I] + [H] * (len(names) - 2) + [O]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="elman")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--quick", action="store_true", help="one size only")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, allowed under the simulator: checks the script runs")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU module")
    args = ap.parse_args()
    name = check_gpu(args.smoke)

    import numpy as np
    from numba import cuda

    from bpttgen.codegen.runtime import cuda as crt

    dtype = np.dtype(args.dtype)
    sync = cuda.synchronize
    gpu = importlib.import_module(f"bpttgen.generated.{args.model}_cuda")
    cpu = importlib.import_module(f"bpttgen.generated.{args.model}")
    print(f"# model {args.model}, {args.dtype}, GPU: {name}")

    if args.smoke:  # the simulator runs a Python thread per GPU thread: keep it tiny
        crt.configure(tile=4, block=8)
        REPEATS.update(repeats=1, min_time=0.0)
    n = 8 if args.smoke else 4096
    ours, cublas = gemm_rates(np, cuda, crt, n, dtype, sync)
    print(f"GEMM {n}^3 on this GPU: tiled kernel of the modules {ours:.0f} GFLOP/s; cuBLAS "
          + (f"{cublas:.0f} GFLOP/s" if cublas else "n/a (CuPy not installed)"))
    rate = cublas or ours

    print(f"\n{'(B, T, I, H, O)':>24} {'device ms':>10} {'GFLOP/s':>8} {'% GEMM':>7} "
          f"{'numpy ms':>9} {'CPU ms':>8} {'CPU/GPU':>8}")
    for B, T, I, H, O in SMOKE if args.smoke else QUICK if args.quick else SIZES:
        sizes = model_sizes(gpu, I, H, O)
        params, x, targets = problem(np, gpu, sizes, T, B, dtype)
        dev = ({k: cuda.to_device(v) for k, v in params.items()}, cuda.to_device(x),
               cuda.to_device(targets))
        device_ms = median_ms(lambda: gpu.loss_and_grads(*dev), sync)
        host_ms = median_ms(lambda: gpu.loss_and_grads(params, x, targets), sync)
        cpu_ms = float("nan") if args.no_cpu else median_ms(
            lambda: cpu.loss_and_grads(params, x, targets), lambda: None)
        gflops = flops_bptt(gpu, sizes, T, B) / (device_ms * 1e-3) / 1e9
        print(f"{str((B, T, I, H, O)):>24} {device_ms:>10.2f} {gflops:>8.1f} "
              f"{100 * gflops / rate:>6.1f}% {host_ms:>9.2f} {cpu_ms:>8.2f} "
              f"{cpu_ms / device_ms:>8.1f}")
    print("\n(device ms: every array on the GPU; numpy ms: NumPy in and out, transfers "
          "included; GFLOP/s counts the matrix products only; % of "
          + ("cuBLAS" if cublas else "the modules' own GEMM kernel") + ")")


if __name__ == "__main__":
    main()
