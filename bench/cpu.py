"""CPU benchmark of generated modules: bptt vs naive over T, and GFLOP/s vs GEMM.

Prints, in one run: ms per loss_and_grads for bptt and naive at T = 64..1024 (the
ratio should grow ~linearly in T: seed 000's n-times claim), bptt's GFLOP/s at
(B,T,I,H,O) = (64,128,256,512,256) against this machine's float32 matrix-product
rate measured in the same run, and first-call compile vs cached-import time.

    python bench/cpu.py [--model elman] [--threads 2] [--quick]
"""

import argparse
import importlib
import os
import subprocess
import sys
import time


def _setup_threads(n):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)


def median_ms(fn, repeats=7, min_time=0.2):
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 200:
            break
    times.sort()
    return 1e3 * times[len(times) // 2]


def flops_bptt(module, sizes, T, B):
    """Matrix-product flops of one loss_and_grads: forward + input/weight adjoints,
    2*m*n*k each, over every weight (elementwise work is not counted)."""
    total = 0
    for name, shape in module.PARAMS.items():
        if len(shape) == 2:
            rows, cols = (sizes[s] for s in shape)
            total += 3 * 2 * rows * cols * T * B  # forward, adjoint of input, of weight
    return total


def gemm_rate(np, n=1024, dtype="float32"):
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(dtype)
    ms = median_ms(lambda: a @ b)
    return 2 * n ** 3 / (ms * 1e-3) / 1e9


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


def compile_times(model):
    """First call with an empty Numba cache vs a second process reading the cache."""
    code = (f"import time, numpy as np; t = time.perf_counter(); import bpttgen.generated.{model} as m; "
            "p = m.init_params({s: 4 for s in m.SIZES}); x = np.ones((3, 2, 4), np.float32); "
            "tg = np.zeros((3, 2), np.int64) if m.SPEC['target'] == 'index' else "
            "np.zeros((3, 2, 4), np.float32); m.loss_and_grads(p, x, tg); "
            "print(time.perf_counter() - t)")
    with_tmp_cache = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"bpttgen-bench-cache-{os.getpid()}"))
    first = float(subprocess.run([sys.executable, "-c", code], env=with_tmp_cache,
                                 capture_output=True, text=True, check=True).stdout)
    cached = float(subprocess.run([sys.executable, "-c", code], env=with_tmp_cache,
                                  capture_output=True, text=True, check=True).stdout)
    return first, cached


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="elman")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer T values (smoke run)")
    args = ap.parse_args()
    _setup_threads(args.threads)
    import numpy as np

    module = importlib.import_module(f"bpttgen.generated.{args.model}")
    print(f"# model {args.model}, float32, {args.threads} threads")

    first, cached = compile_times(args.model)
    print(f"first call incl. compile: {first:.2f} s; import + call from Numba's cache: "
          f"{cached:.2f} s")

    B, I, H, O = 32, 64, 128, 64
    sizes = dict(zip(module.SIZES, [I, H, O] if len(module.SIZES) == 3 else
                     [I] + [H] * (len(module.SIZES) - 2) + [O]))
    print(f"\nbptt vs naive at (B, I, H, O) = ({B}, {I}, {H}, {O})")
    print(f"{'T':>6} {'bptt ms':>10} {'naive ms':>10} {'naive/bptt':>11} {'(T+1)/2':>8}")
    Ts = [64, 128, 256] if args.quick else [64, 128, 256, 512, 1024]
    bptt_ms = {}
    for T in Ts:
        params, x, targets = problem(np, module, sizes, T, B, np.float32)
        bptt_ms[T] = median_ms(lambda: module.loss_and_grads(params, x, targets))
        naive = median_ms(lambda: module.loss_and_grads(params, x, targets,
                                                        algorithm="naive"), repeats=1,
                          min_time=0)
        print(f"{T:>6} {bptt_ms[T]:>10.2f} {naive:>10.1f} {naive / bptt_ms[T]:>11.1f} "
              f"{(T + 1) / 2:>8.1f}")
    lo, hi = Ts[1], Ts[-1]
    print(f"bptt t({hi})/t({lo}) = {bptt_ms[hi] / bptt_ms[lo]:.2f} "
          f"(linear: {hi / lo:.0f}; goal for 1024/128: <= 9)")

    rate = gemm_rate(np)
    B, T, I, H, O = 64, 128, 256, 512, 256
    sizes = dict(zip(module.SIZES, [I, H, O] if len(module.SIZES) == 3 else
                     [I] + [H] * (len(module.SIZES) - 2) + [O]))
    params, x, targets = problem(np, module, sizes, T, B, np.float32)
    ms = median_ms(lambda: module.loss_and_grads(params, x, targets))
    gflops = flops_bptt(module, sizes, T, B) / (ms * 1e-3) / 1e9
    print(f"\nfloat32 GEMM (1024^3) on this machine: {rate:.1f} GFLOP/s")
    print(f"bptt at (B,T,I,H,O) = ({B},{T},{I},{H},{O}): {ms:.1f} ms, {gflops:.1f} GFLOP/s "
          f"= {100 * gflops / rate:.0f}% of the GEMM rate (goal >= 50%)")


if __name__ == "__main__":
    main()
