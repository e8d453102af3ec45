"""bpttgen's generated kernels against PyTorch and JAX: loss + all gradients, float32.

For Elman, LSTM and GRU (PyTorch's gate equations) at four sizes (B, T, I, H, O),
and the LayerNorm LSTM of PyTorch's fastrnns custom_lstms (``--models
layernorm_lstm``: LayerNorm over the four gates' input products, over their
recurrent products, and over the cell; torch.nn has no such cell, so torch-nn is
left out for it and its float64 check is against torch-cell), one process times,
interleaved round by round so that load from other processes hits every framework
alike:

    bpttgen      generated/<model>.py loss_and_grads (Numba, accumulated BPTT)
    torch-cell   PyTorch eager, a hand-written cell in a Python loop (a new cell)
    torch-compile  the same cell under torch.compile (opt-in: --frameworks)
    torch-nn     torch.nn.RNN / LSTM / GRU (fused, oneDNN on CPU)
    jax-scan     jax.jit(jax.value_and_grad(loss)) over lax.scan, the cell as written
    jax-hoisted  the same with the input projection of all steps taken out of the
                 scan as one product (what a careful JAX user writes)

Before any timing, every framework's loss and gradients are compared with bpttgen's
at the same size (max |a - b| / max |b| per parameter <= 1e-4 in float32), and once
in float64 at a tiny size against torch.nn (<= 1e-9), which proves the parameter
mapping exact. Reported: ms per call (median over interleaved rounds of blocks of calls),
the first call (compile) separately, GFLOP/s of the matrix products, the ratio of
each framework's time to bpttgen's, the float32 matrix-product rate of the machine
(1024^3, NumPy/OpenBLAS and torch) measured in the same run, and the load average.

    python bench/frameworks.py [--threads 2] [--models elman,lstm,gru]
                               [--sizes 8,256,32,32,32 ...] [--quick] [--out DIR]
"""

import argparse
import os
import platform
import subprocess
import sys
import time

SIZES = ((8, 256, 32, 32, 32), (32, 128, 64, 128, 64), (32, 512, 64, 128, 64),
         (64, 128, 256, 512, 256))
QUICK_SIZES = ((4, 16, 8, 8, 8), (8, 32, 16, 32, 16))
MODELS = ("elman", "lstm", "gru")
FRAMEWORKS = ("bpttgen", "torch-cell", "torch-nn", "jax-scan", "jax-hoisted")
GATES = {"elman": 1, "lstm": 4, "gru": 3, "layernorm_lstm": 4}
NO_TORCH_NN = {"layernorm_lstm"}  # no fused torch.nn module computes these cells
TOLERANCE_F32 = 1e-4
TOLERANCE_F64 = 1e-9
HERE = os.path.dirname(os.path.abspath(__file__))


def pin_threads(n):
    """Every library's thread count to n; must run before numpy/torch/jax load."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)
    # XLA's CPU client sizes its pool from the CPUs this process may use.
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cpus[:n])


# -- parameter layout ---------------------------------------------------------------
# The frameworks hold the gates stacked row-wise in PyTorch's order: W_ih (G*H, I),
# W_hh (G*H, H), b_ih (G*H,), b_hh (G*H,) or None where bpttgen has one bias per
# gate (torch.nn then gets a zero bias_hh whose gradient is ignored).
STACKED = {
    "elman": dict(W_ih=["W_xh"], W_hh=["W_hh"], b_ih=["b_h"], b_hh=None, W_y="W_hy"),
    "lstm": dict(W_ih=["W_i", "W_f", "W_g", "W_o"], W_hh=["U_i", "U_f", "U_g", "U_o"],
                 b_ih=["b_i", "b_f", "b_g", "b_o"], b_hh=None, W_y="W_y"),
    "gru": dict(W_ih=["W_r", "W_z", "W_n"], W_hh=["U_r", "U_z", "U_n"],
                b_ih=["b_ir", "b_iz", "b_in"], b_hh=["b_hr", "b_hz", "b_hn"], W_y="W_y"),
    # the products have no bias (the LayerNorms' biases follow them); ln_x and ln_h
    # normalise the four gates' products together, with a gain and a bias per gate
    "layernorm_lstm": dict(
        W_ih=["W_i", "W_f", "W_g", "W_o"], W_hh=["U_i", "U_f", "U_g", "U_o"], b_ih=None,
        b_hh=None, W_y="W_y",
        gain_x=[f"gamma_x{g}" for g in "ifgo"], bias_x=[f"beta_x{g}" for g in "ifgo"],
        gain_h=[f"gamma_h{g}" for g in "ifgo"], bias_h=[f"beta_h{g}" for g in "ifgo"],
        gain_c=["gamma_c"], bias_c=["beta_c"]),
}


def _stacks(model):
    """The stacked parameters of a model: name -> bpttgen's names, gate by gate."""
    return {k: v for k, v in STACKED[model].items() if k != "W_y" and v is not None}


def to_stacked(np, model, params):
    out = {k: np.ascontiguousarray(np.concatenate([params[n] for n in names]))
           for k, names in _stacks(model).items()}
    out["W_y"], out["b_y"] = params[STACKED[model]["W_y"]], params["b_y"]
    return out


def from_stacked(np, model, grads, H):
    """Stacked gradients (numpy) back to bpttgen's names."""
    out = {}
    for k, names in _stacks(model).items():
        if k in grads:
            for j, name in enumerate(names):
                out[name] = grads[k][j * H:(j + 1) * H]
    out[STACKED[model]["W_y"]], out["b_y"] = grads["W_y"], grads["b_y"]
    return out


def flops(model, B, T, I, H, O):
    """Matrix-product flops of one loss + gradients call: 2mnk for every product
    forward, for the weight gradient, and for the input adjoint except the one of x."""
    G = GATES[model]
    recurrent_and_readout = G * H * H + O * H
    return 2 * T * B * (3 * recurrent_and_readout + 2 * G * H * I)


def problem(np, module, model, B, T, I, H, O, dtype, seed=0):
    """Random parameters (biases too, so their mapping is checked), x, targets."""
    rng = np.random.default_rng(seed)
    sizes = {"I": I, "H": H, "O": O}
    params = {}
    for name, shape in module.PARAMS.items():
        dims = [sizes[s] for s in shape]
        bound = 1.0 / (sizes[shape[-1]] ** 0.5 if len(shape) == 2 else H ** 0.5)
        params[name] = rng.uniform(-bound, bound, dims).astype(dtype)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    targets = rng.integers(0, O, (T, B))
    return params, x, targets


# -- the cells, written once over an array namespace (torch or jax.numpy) ------------
def _split(ops, a, n):
    H = a.shape[-1] // n
    return [a[..., j * H:(j + 1) * H] for j in range(n)]


def layernorm(ops, a, gain, bias, eps=1e-5):
    """torch.nn.LayerNorm over the last axis (biased variance), then gain and bias."""
    mu = ops.mean(a)
    var = ops.mean((a - mu) ** 2)
    return (a - mu) / ops.sqrt(var + eps) * gain + bias


def input_projection(model, ops, P, x):
    """The input's part of every gate, for one step or all of them at once."""
    if model == "layernorm_lstm":
        return layernorm(ops, x @ P["W_ih"].T, P["gain_x"], P["bias_x"])
    return x @ P["W_ih"].T + P["b_ih"]


def cell(model, ops, P, gx, state):
    """One step from gx = input_projection(x_t) (all gates) and the previous state."""
    if model == "layernorm_lstm":
        h, c = state
        gh = layernorm(ops, h @ P["W_hh"].T, P["gain_h"], P["bias_h"])
        i, f, g, o = _split(ops, gx + gh, 4)
        c = layernorm(ops, ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g), P["gain_c"],
                      P["bias_c"])
        return ops.sigmoid(o) * ops.tanh(c), c
    if model == "elman":
        (h,) = state
        return (ops.tanh(gx + h @ P["W_hh"].T),)
    if model == "lstm":
        h, c = state
        i, f, g, o = _split(ops, gx + h @ P["W_hh"].T, 4)
        c = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
        return ops.sigmoid(o) * ops.tanh(c), c
    (h,) = state
    xr, xz, xn = _split(ops, gx, 3)
    hr, hz, hn = _split(ops, h @ P["W_hh"].T + P["b_hh"], 3)
    r, z = ops.sigmoid(xr + hr), ops.sigmoid(xz + hz)
    n = ops.tanh(xn + r * hn)
    return ((1 - z) * n + z * h,)


def n_states(model):
    return 2 if model in ("lstm", "layernorm_lstm") else 1


class TorchOps:
    """The array functions the cells use, for torch tensors."""

    @staticmethod
    def mean(a):
        return a.mean(-1, keepdim=True)

    def __getattr__(self, name):  # tanh, sigmoid, sqrt
        import torch
        return getattr(torch, name)


# -- runners: each returns (run, grads) where run() does one loss + gradients call and
# -- grads() gives (loss, {bpttgen name: numpy gradient}) of the last call ------------
def bpttgen_runner(np, module, model, params, x, targets):
    last = {}

    def run():
        last["out"] = module.loss_and_grads(params, x, targets)

    return run, lambda: last["out"]


def torch_runner(torch, np, model, kind, params, x, targets):
    import torch.nn.functional as F

    T, B, _ = x.shape
    stacked = to_stacked(np, model, params)
    H = stacked["W_hh"].shape[1]
    P = {k: torch.tensor(v, requires_grad=True) for k, v in stacked.items()}
    xt, tg = torch.from_numpy(x), torch.from_numpy(targets).reshape(-1)
    if kind == "nn":
        G, I = GATES[model], x.shape[2]
        rnn = {"elman": lambda: torch.nn.RNN(I, H, nonlinearity="tanh"),
               "lstm": lambda: torch.nn.LSTM(I, H), "gru": lambda: torch.nn.GRU(I, H)}[model]()
        with torch.no_grad():
            rnn.weight_ih_l0.copy_(P["W_ih"])
            rnn.weight_hh_l0.copy_(P["W_hh"])
            rnn.bias_ih_l0.copy_(P["b_ih"])
            rnn.bias_hh_l0.copy_(P["b_hh"] if "b_hh" in P else torch.zeros(G * H))
        leaves = {"W_ih": rnn.weight_ih_l0, "W_hh": rnn.weight_hh_l0,
                  "b_ih": rnn.bias_ih_l0, "b_hh": rnn.bias_hh_l0,
                  "W_y": P["W_y"], "b_y": P["b_y"]}

        def hidden():
            return rnn(xt)[0]
    else:
        leaves = P
        ops = TorchOps()
        step = (lambda gx, state: cell(model, ops, P, gx, state))
        if kind == "compile":  # one step compiled; the loop stays Python's
            step = torch.compile(step, dynamic=False)

        def hidden():
            state = tuple(torch.zeros(B, H) for _ in range(n_states(model)))
            hs = []
            for t in range(T):
                state = step(input_projection(model, ops, P, xt[t]), state)
                hs.append(state[0])
            return torch.stack(hs)

    last = {}

    def run():
        for p in leaves.values():
            p.grad = None
        z = hidden() @ leaves["W_y"].T + leaves["b_y"]
        loss = F.cross_entropy(z.reshape(T * B, -1), tg)
        loss.backward()
        last["loss"] = loss

    def grads():
        g = {k: p.grad.numpy() for k, p in leaves.items() if k != "b_hh" or "b_hh" in P}
        return float(last["loss"].detach()), from_stacked(np, model, g, H)

    return run, grads


def jax_runner(jax, np, model, hoisted, params, x, targets):
    import jax.numpy as jnp
    from jax import lax

    T, B, _ = x.shape
    stacked = to_stacked(np, model, params)
    H = stacked["W_hh"].shape[1]
    P = {k: jnp.asarray(v) for k, v in stacked.items()}
    xj, tg = jnp.asarray(x), jnp.asarray(targets)

    class ops:
        tanh = staticmethod(jnp.tanh)
        sigmoid = staticmethod(jax.nn.sigmoid)
        sqrt = staticmethod(jnp.sqrt)
        mean = staticmethod(lambda a: jnp.mean(a, axis=-1, keepdims=True))

    def loss_fn(P, x, tg):
        state0 = tuple(jnp.zeros((B, H), x.dtype) for _ in range(n_states(model)))

        def step(state, inp):
            gx = inp if hoisted else input_projection(model, ops, P, inp)
            state = cell(model, ops, P, gx, state)
            return state, state[0]

        xs = input_projection(model, ops, P, x) if hoisted else x
        _, hs = lax.scan(step, state0, xs)
        z = hs @ P["W_y"].T + P["b_y"]
        logp = jax.nn.log_softmax(z, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tg[..., None], axis=-1))

    f = jax.jit(jax.value_and_grad(loss_fn))
    last = {}

    def run():
        last["out"] = jax.block_until_ready(f(P, xj, tg))

    def grads():
        loss, g = last["out"]
        return float(loss), from_stacked(np, model, {k: np.asarray(v) for k, v in g.items()}, H)

    return run, grads


# -- measuring -----------------------------------------------------------------------
def max_error(np, grads, ref):
    """Worst over parameters of max |g - ref| / max |ref|."""
    worst = 0.0
    for name, r in ref.items():
        r64, g64 = np.asarray(r, np.float64), np.asarray(grads[name], np.float64)
        scale = max(float(np.max(np.abs(r64))), 1e-30)
        worst = max(worst, float(np.max(np.abs(g64 - r64))) / scale)
    return worst


def timed_rounds(runners, min_rounds, max_rounds, min_time, pause=0.25, block=0.5):
    """Interleaved: each round times every runner once, in a rotating order, as the
    median of a block of calls (as many as fill ``block`` seconds, at least one) after
    a pause and an untimed call: each library timed in its own steady state, as a
    training loop calls it, not beside the threads of the library before it nor on
    cores just woken. On the 2-core VM of BENCHMARKS.md: worker threads spin after
    their work (OpenBLAS's 0.1-0.2 s after a product on several threads: a 1024^3
    torch matmul ran at 148-199 GFLOP/s 10-50 ms after a bpttgen call that used
    OpenBLAS's two threads, 245-279 from 0.2 s on), hence the pause; and after 50 ms
    idle, calls that keep both cores busy ran up to 1.7x slower for their first
    ~0.1 s (Elman at (32,128,64,128,64) split over two threads: 12.5-19 ms for seven
    calls, then 7.8), hence the block. Returns {name: [seconds, ...]}, one per round."""
    names = list(runners)
    times = {n: [] for n in names}
    start = time.perf_counter()
    r = 0
    while r < min_rounds or (time.perf_counter() - start < min_time and r < max_rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            time.sleep(pause)
            runners[n]()
            calls, end = [], time.perf_counter() + block
            while not calls or time.perf_counter() < end:
                t = time.perf_counter()
                runners[n]()
                calls.append(time.perf_counter() - t)
            times[n].append(sorted(calls)[len(calls) // 2])
        r += 1
    return times


def gemm_rates(np, torch, n=1024, repeats=7):
    """float32 (n x n) @ (n x n) in GFLOP/s: NumPy (OpenBLAS, what Numba's np.dot
    calls) and torch (MKL/oneDNN), interleaved, median."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    times = timed_rounds({"numpy": lambda: a @ b, "torch": lambda: ta @ tb}, repeats,
                         repeats, 0)
    return {k: 2 * n ** 3 / sorted(v)[len(v) // 2] / 1e9 for k, v in times.items()}


def cold_compile_seconds(model):
    """First call of a generated module with an empty Numba cache (a fresh process
    and cache folder): the compile time a user sees once per machine."""
    code = (f"import time; t = time.perf_counter(); import numpy as np; "
            f"import bpttgen.generated.{model} as m; "
            "p = m.init_params({'I': 4, 'H': 4, 'O': 4}); x = np.ones((3, 2, 4), np.float32); "
            "m.loss_and_grads(p, x, np.zeros((3, 2), np.int64)); print(time.perf_counter() - t)")
    cache = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bpttgen-fw-cache-{os.getpid()}")
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(HERE))
    return float(out.stdout.strip().splitlines()[-1])


def profile_phases(np, module, params, x, targets, repeats=9):
    """Median ms of each phase of one bpttgen bptt call, run one by one on a fresh
    workspace: Python checks, workspace allocation, every Numba kernel, the weight
    gradient products (NumPy, outside Numba), and the per-step products of the two
    loops alone (np.dot in a Numba loop, same shapes) to split GEMM from elementwise
    work. Relies on the generated module's private layout (_workspace, _ARGS)."""
    from numba import njit

    from bpttgen.codegen import runtime

    @njit(cache=True)
    def step_products(a, w, out, T, B, lo_shift):
        for t in range(T):
            np.dot(a[t * B + lo_shift:(t + 1) * B + lo_shift], w, out)

    T, B, _ = x.shape
    dtype = x.dtype
    sizes = {s: params[n].shape[i] for n, shape in module.PARAMS.items()
             for i, s in enumerate(shape)}
    flat = np.ascontiguousarray(targets.reshape(-1))
    spans = {}

    def note(name, seconds):
        spans.setdefault(name, []).append(seconds)

    for _ in range(repeats):
        t = time.perf_counter()
        module.loss_and_grads(params, x, targets)
        note("total (loss_and_grads)", time.perf_counter() - t)
        t = time.perf_counter()
        runtime.check_call(module.SPEC, params, x, targets, None, None)
        weights, total = runtime.loss_weights(module.SPEC, T, B, None, dtype)
        note("python checks", time.perf_counter() - t)
        t = time.perf_counter()
        ws = module._workspace(sizes, T, B, dtype, params, x, None)
        note("workspace (allocate + zero)", time.perf_counter() - t)
        args = (tuple(ws[a] for a in module._ARGS),)  # the kernels take one tuple
        y = np.empty((T * B, sizes["O"]), dtype)
        for name, call in (
                ("forward: input projection", lambda: module._forward_pre(*args)),
                ("forward: recurrent loop", lambda: module._forward_loop(*args)),
                ("forward: readout", lambda: module._forward_post(*args)),
                ("loss (softmax CE)", lambda: module._loss(T * B, sizes["O"], ws["z_seq"], flat,
                                                           weights, 1.0 / total, y,
                                                           ws["d_z_seq"])),
                ("backward: readout adjoint", lambda: module._backward_post(*args)),
                ("backward: recurrent loop", lambda: module._backward_loop(T - 1, 0, *args)),
                ("backward: pre-loop adjoints", lambda: module._backward_pre(*args))):
            t = time.perf_counter()
            call()
            note(name, time.perf_counter() - t)
        t = time.perf_counter()
        if hasattr(module, "_weight_gradients"):  # inside Numba since 095298d
            module._weight_gradients(*args)
        else:
            TB = T * B
            for group, rows in (("x", ws["x_seq"]), ("h_prev", ws["h_seq"][:TB]),
                                ("h", ws["h_seq"][B:TB + B])):
                if f"d_P_{group}_seq" in ws:
                    ws[f"d_P_{group}_seq"].T @ rows
        note("weight gradients (one GEMM per group)", time.perf_counter() - t)
        W = ws["W_P_h_prev"]
        out_f = np.empty((B, W.shape[0]), dtype)
        out_b = np.empty((B, W.shape[1]), dtype)
        t = time.perf_counter()
        WT = ws.get("WT_P_h_prev")  # the kernels' transposed copy, where W is small
        step_products(ws["h_seq"], WT if WT is not None and WT.shape[0] else W.T, out_f, T, B,
                      0)
        note("  of which forward per-step GEMMs", time.perf_counter() - t)
        t = time.perf_counter()
        step_products(ws["d_P_h_prev_seq"], W, out_b, T, B, 0)
        note("  of which backward per-step GEMMs", time.perf_counter() - t)
    return {k: 1e3 * sorted(v)[len(v) // 2] for k, v in spans.items()}


def check_float64(np, torch, module, model):
    """Tiny float64 problem: bpttgen vs torch.nn (the hand-written torch cell where
    torch.nn has none), exact up to rounding."""
    params, x, targets = problem(np, module, model, 3, 7, 5, 6, 4, np.float64, seed=1)
    torch.set_default_dtype(torch.float64)
    try:
        kind = "cell" if model in NO_TORCH_NN else "nn"
        run, grads = torch_runner(torch, np, model, kind, params, x, targets)
        run()
        loss_t, g_t = grads()
    finally:
        torch.set_default_dtype(torch.float32)
    loss_b, g_b = module.loss_and_grads(params, x, targets)
    return max(max_error(np, g_t, g_b), abs(loss_t - loss_b) / abs(loss_b))


def machine():
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        flags = "AVX-512" if "avx512f" in text else ("AVX2" if "avx2" in text else "")
    except OSError:
        pass
    return f"{cpu} ({flags}), {os.cpu_count()} cores"


def source_version():
    """The commit of the generated modules measured (a snapshot made with
    `git archive` has no .git: it sets BPTTGEN_COMMIT)."""
    root = os.path.dirname(HERE)
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "generated",
                                "codegen", "templates"], capture_output=True, text=True,
                               check=True).stdout.strip()
        return commit + (" + uncommitted changes in generated/codegen/templates" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("BPTTGEN_COMMIT", "unknown")


def fmt_load():
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sizes", nargs="*", help="B,T,I,H,O each (default: the four of issue 7)")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few rounds (a smoke run)")
    ap.add_argument("--min-time", type=float, default=4.0,
                    help="seconds of timed rounds per (model, size), at least")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds at least")
    ap.add_argument("--from-csv", metavar="CSV",
                    help="rebuild the .md and .png of an earlier run from its .csv")
    ap.add_argument("--profile", action="store_true",
                    help="only profile bpttgen's phases at each size (no frameworks)")
    ap.add_argument("--no-cold-compile", action="store_true",
                    help="skip the empty-cache compile time of each generated module")
    ap.add_argument("--out", default=os.path.join(HERE, "results"),
                    help="folder for frameworks[_<models>].csv / .md / .png ('' for none)")
    args = ap.parse_args(argv)
    if args.from_csv:
        return rewrite_from_csv(args.from_csv, args.out)
    pin_threads(args.threads)

    import importlib

    import numpy as np
    import torch
    import jax

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    jax.config.update("jax_platforms", "cpu")
    import numba

    models = args.models.split(",")
    frameworks = args.frameworks.split(",")
    if args.sizes:
        sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes]
    else:
        sizes = QUICK_SIZES if args.quick else SIZES
    if args.quick:
        args.min_time, args.rounds = 0.2, 3

    header = [
        f"machine: {machine()}; threads pinned to {args.threads}",
        f"versions: python {platform.python_version()}, numpy {np.__version__}, numba "
        f"{numba.__version__}, torch {torch.__version__}, jax {jax.__version__}; bpttgen "
        f"{source_version()}",
        "command: python bench/frameworks.py " + " ".join(argv if argv is not None
                                                          else sys.argv[1:]),
        f"load average at start (1/5/15 min): {fmt_load()}",
    ]
    for line in header:
        print("# " + line, flush=True)

    if args.profile:
        return profile_main(np, importlib, models, sizes, args.out)
    rows, checks = [], []
    for model in models:
        module = importlib.import_module(f"bpttgen.generated.{model}")
        cold = None if args.no_cold_compile else cold_compile_seconds(model)
        err64 = check_float64(np, torch, module, model)
        checks.append((model, err64))
        print(f"\n## {model}: float64 bpttgen vs torch.nn at a tiny size, max rel. error "
              f"{err64:.1e} ({'ok' if err64 <= TOLERANCE_F64 else 'FAILED'})"
              + ("" if cold is None else f"; bpttgen cold compile (empty cache) {cold:.1f} s"),
              flush=True)
        fws = [f for f in frameworks if not (f == "torch-nn" and model in NO_TORCH_NN)]
        for (B, T, I, H, O) in sizes:
            params, x, targets = problem(np, module, model, B, T, I, H, O, np.float32)
            makers = {
                "bpttgen": lambda: bpttgen_runner(np, module, model, params, x, targets),
                "torch-cell": lambda: torch_runner(torch, np, model, "cell", params, x, targets),
                "torch-compile": lambda: torch_runner(torch, np, model, "compile", params, x,
                                                      targets),
                "torch-nn": lambda: torch_runner(torch, np, model, "nn", params, x, targets),
                "jax-scan": lambda: jax_runner(jax, np, model, False, params, x, targets),
                "jax-hoisted": lambda: jax_runner(jax, np, model, True, params, x, targets),
            }
            runners, first, errors, load0 = {}, {}, {}, fmt_load()
            for name in fws:
                run, grads = makers[name]()
                t = time.perf_counter()
                run()  # first call: JAX traces and compiles, Numba loads its cache
                first[name] = time.perf_counter() - t
                runners[name] = (run, grads)
            loss_ref, g_ref = runners["bpttgen"][1]()
            for name in fws:
                loss, g = runners[name][1]()
                errors[name] = max(max_error(np, g, g_ref),
                                   abs(loss - loss_ref) / abs(loss_ref))
            for _ in range(2):  # warm-up
                for name in fws:
                    runners[name][0]()
            if (B, T, I, H, O) == max(sizes, key=lambda s: s[0] * s[1] * s[3]):
                gemm = gemm_rates(np, torch)
            else:
                gemm = None
            times = timed_rounds({n: r[0] for n, r in runners.items()}, args.rounds,
                                 200, args.min_time)
            ms = {n: 1e3 * sorted(v)[len(v) // 2] for n, v in times.items()}
            fl = flops(model, B, T, I, H, O)
            for name in fws:
                rows.append(dict(model=model, B=B, T=T, I=I, H=H, O=O, framework=name,
                                 ms=ms[name], first_ms=1e3 * first[name],
                                 gflops=fl / (ms[name] * 1e-3) / 1e9,
                                 ratio=ms[name] / ms["bpttgen"], error=errors[name],
                                 rounds=len(times[name]), load=f"{load0} -> {fmt_load()}",
                                 gemm_numpy=gemm and gemm["numpy"],
                                 gemm_torch=gemm and gemm["torch"]))
            print(f"\n(B,T,I,H,O) = {(B, T, I, H, O)}: {len(times['bpttgen'])} rounds, "
                  f"load {load0} -> {fmt_load()}"
                  + ("" if gemm is None else f"; GEMM 1024^3: numpy {gemm['numpy']:.0f}, "
                     f"torch {gemm['torch']:.0f} GFLOP/s"))
            print(f"{'framework':<12} {'ms':>9} {'first ms':>9} {'GFLOP/s':>8} "
                  f"{'x bpttgen':>9} {'grad err':>9}")
            for r in rows[-len(fws):]:
                flag = "" if r["error"] <= TOLERANCE_F32 else "  FAILED check"
                print(f"{r['framework']:<12} {r['ms']:>9.2f} {r['first_ms']:>9.0f} "
                      f"{r['gflops']:>8.1f} {r['ratio']:>9.2f} {r['error']:>9.1e}{flag}",
                      flush=True)
    print(f"\n# load average at end: {fmt_load()}")
    if args.out:
        stem = "frameworks" if models == list(MODELS) else "frameworks_" + "_".join(models)
        write_results(args.out, stem, header, rows, checks, frameworks)
    failed = [r for r in rows if r["error"] > TOLERANCE_F32] + \
        [c for c in checks if c[1] > TOLERANCE_F64]
    return 1 if failed else 0


def profile_main(np, importlib, models, sizes, folder):
    """Phase breakdown of bpttgen's bptt call for every model and size."""
    lines = []
    for model in models:
        module = importlib.import_module(f"bpttgen.generated.{model}")
        for (B, T, I, H, O) in sizes:
            params, x, targets = problem(np, module, model, B, T, I, H, O, np.float32)
            module.loss_and_grads(params, x, targets)
            ms = profile_phases(np, module, params, x, targets)
            total = ms.pop("total (loss_and_grads)")
            lines += ["", f"#### {model} (B,T,I,H,O) = {(B, T, I, H, O)}: {total:.2f} ms per "
                      f"call, load {fmt_load()}", "", "| phase | ms | % of call |", "|---|---:|---:|"]
            for name, v in ms.items():
                lines.append(f"| {name} | {v:.3f} | {100 * v / total:.0f}% |")
            rest = total - sum(v for k, v in ms.items() if not k.startswith("  "))
            lines.append(f"| rest (Python glue, gradient dict) | {rest:.3f} | "
                         f"{100 * rest / total:.0f}% |")
            print("\n".join(lines[-(len(ms) + 6):]), flush=True)
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "profile.md"), "w") as f:
            f.write("\n".join(lines).lstrip() + "\n")
    return 0


def rewrite_from_csv(path, folder):
    """The .md and .png of a run from its .csv (header lines from the old .md)."""
    import csv

    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("ms", "first_ms", "gflops", "ratio", "error"):
            r[k] = float(r[k])
        for k in ("B", "T", "I", "H", "O"):
            r[k] = int(r[k])
    stem = os.path.splitext(os.path.basename(path))[0]
    old_md = os.path.splitext(path)[0] + ".md"
    header, checks = [], []
    if os.path.exists(old_md):
        with open(old_md) as f:
            for line in f:
                if line.startswith("- float64 check"):
                    checks = [(m, float(e)) for m, e in
                              (p.split() for p in line.split(": ", 1)[1].split(", "))]
                elif line.startswith("- ") and "GEMM" not in line:
                    header.append(line[2:].rstrip("\n"))
                elif not line.startswith("- "):
                    break
    frameworks = list(dict.fromkeys(r["framework"] for r in rows))
    write_results(folder or os.path.dirname(path), stem, header, rows, checks, frameworks)
    return 0


def write_results(folder, stem, header, rows, checks, frameworks):
    import csv

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, stem + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"- {h}" for h in header]
    lines.append("- float64 check vs torch.nn, or the torch cell where torch.nn has none "
                 "(tiny size): " + ", ".join(
        f"{m} {e:.0e}" for m, e in checks))
    gemm_lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += ["", f"### {model}", "",
                  "| (B,T,I,H,O) | " + " | ".join(frameworks) + " |",
                  "|---|" + "---:|" * len(frameworks)]
        for size in dict.fromkeys((r["B"], r["T"], r["I"], r["H"], r["O"]) for r in rows
                                  if r["model"] == model):
            sel = {r["framework"]: r for r in rows if r["model"] == model
                   and (r["B"], r["T"], r["I"], r["H"], r["O"]) == size}
            cells = []
            for fw in frameworks:
                r = sel.get(fw)
                if r is None:
                    cells.append("n/a")
                elif fw == "bpttgen":
                    cells.append(f"**{r['ms']:.2f} ms** ({r['gflops']:.0f} GF/s)")
                else:
                    cells.append(f"{r['ms']:.2f} ms ({r['ratio']:.2f}x)")
            lines.append(f"| {','.join(map(str, size))} | " + " | ".join(cells) + " |")
        lines += ["", "First call (ms; JAX: trace + XLA compile; bpttgen: Numba cache load):",
                  "", "| (B,T,I,H,O) | " + " | ".join(frameworks)
                  + " | max grad err | load (1-min avg) before -> after |",
                  "|---|" + "---:|" * (len(frameworks) + 2)]
        for size in dict.fromkeys((r["B"], r["T"], r["I"], r["H"], r["O"]) for r in rows
                                  if r["model"] == model):
            sel = [r for r in rows if r["model"] == model
                   and (r["B"], r["T"], r["I"], r["H"], r["O"]) == size]
            first = {r["framework"]: f"{r['first_ms']:.0f}" for r in sel}
            lines.append(f"| {','.join(map(str, size))} | "
                         + " | ".join(first.get(fw, "n/a") for fw in frameworks)
                         + f" | {max(r['error'] for r in sel):.1e} | "
                         + " -> ".join(part.split("/")[0] for part in sel[0]["load"].split(" -> "))
                         + " |")
            if sel[0]["gemm_numpy"]:
                gemm_lines.append(f"- float32 GEMM 1024^3 measured with {model} at "
                                  f"{','.join(map(str, size))}: NumPy/OpenBLAS "
                                  f"{float(sel[0]['gemm_numpy']):.0f} GFLOP/s, torch "
                                  f"{float(sel[0]['gemm_torch']):.0f} GFLOP/s")
    lines[len(header) + 1:len(header) + 1] = gemm_lines
    with open(os.path.join(folder, stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(os.path.join(folder, stem + ".png"), rows, frameworks)


def plot(path, rows, frameworks):
    """Bars: each framework's time / bpttgen's, per model and size (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    others = [f for f in frameworks if f != "bpttgen"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), sharey=True,
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        sizes = list(dict.fromkeys((r["B"], r["T"], r["I"], r["H"], r["O"]) for r in rows
                                   if r["model"] == model))
        width = 0.8 / len(others)
        for j, fw in enumerate(others):
            vals = [next((r["ratio"] for r in rows if r["model"] == model
                          and r["framework"] == fw
                          and (r["B"], r["T"], r["I"], r["H"], r["O"]) == s), 0)
                    for s in sizes]  # 0: the framework has no such cell
            ax.bar([i + j * width for i in range(len(sizes))], vals, width, label=fw)
        ax.axhline(1.0, color="k", lw=1)
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sizes))])
        ax.set_xticklabels(["\n".join([",".join(map(str, s[:2])), ",".join(map(str, s[2:]))])
                            for s in sizes], fontsize=8)
        ax.set_title(f"{model}: time / bpttgen time (>1: bpttgen faster)", fontsize=9)
        ax.set_xlabel("B,T / I,H,O")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
