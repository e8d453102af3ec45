"""Peak resident memory and time of the exact gradient of one long sequence.

    python bench/memory.py                          # T = 1e3 .. 1e6, every method
    python bench/memory.py --T 1000,100000 --methods full,sqrt,jax-checkpoint
    python bench/memory.py --plot memory.png

An LSTM (H = 128, B = 8 streams, float32) reads tinyshakespeare (../shared/data, V = 65
characters, one-hot) as one sequence per stream and computes the mean cross-entropy
of the next character and its gradient with respect to every parameter, once, over T
steps. Each (method, T) runs in a fresh process, so its peak resident memory
(ru_maxrss) is its own; "over base" subtracts the process's resident memory just
before the call (Python, NumPy, Numba, the compiled kernels, the 1 MB corpus).

Methods (bpttgen's input is made per segment from the corpus, never whole, except by
"full", which is given x whole; JAX and PyTorch get the (T, B) codes, 8 MB at 10^6,
and make one-hot rows per step or per segment):

    full             bpttgen, algorithm="bptt": the whole trajectory stored
    sqrt             bpttgen, algorithm="checkpoint": sqrt(T) segments, a snapshot at
                     each boundary (one extra forward)
    binomial         bpttgen, algorithm="checkpoint", memory_limit=--budget MiB: the
                     fastest binomial plan within it
    stream           bpttgen Trainer.fit_stream, truncated BPTT (k1 = k2 = 64) over the
                     stream in chunks of 4096 steps, an update per window (lr 1e-9):
                     truncated BPTT's gradients, not the full one; its own T range
    jax-checkpoint   lax.scan over segments of ~sqrt(T) steps, each jax.checkpoint-ed
                     (the strongest a careful JAX user writes), one-hot in the step
    torch-checkpoint torch.utils.checkpoint over segments of ~sqrt(T) steps, each an
                     nn.LSTM call (MKL's fused cell) and its readout

Every method starts from the same parameters (bpttgen's init_params, seed 0, copied
into JAX and PyTorch), so the losses printed must agree; the run checks they do.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "..", "shared", "data", "tinyshakespeare.txt")
H, B = 128, 8
METHODS = ("full", "sqrt", "binomial", "stream", "jax-checkpoint", "torch-checkpoint")


# -- data -------------------------------------------------------------------------

class Corpus:
    """The codes of B streams over the corpus, made per slice (never held for all T):
    stream b reads tinyshakespeare from b/B of the way in, wrapping around. V = 65."""

    def __init__(self):
        with open(CORPUS, encoding="utf-8") as f:
            text = f.read()
        chars = sorted(set(text))
        code = {ch: i for i, ch in enumerate(chars)}
        self.codes = np.fromiter((code[ch] for ch in text), np.uint8, len(text))
        self.V = len(chars)

    def __call__(self, a, b):
        """(b - a, B) codes of steps a .. b-1."""
        N = len(self.codes)
        index = (np.arange(a, b)[:, None] + np.arange(B)[None, :] * (N // B)) % N
        return self.codes[index]


class OneHot:
    """x (T, B, V) float32 read by slices: the one-hot rows of steps a .. b-1, made when
    read (what a sequence too long to hold looks like to loss_and_grads)."""

    def __init__(self, corpus, T):
        self.corpus, self.V = corpus, corpus.V
        self.shape = (T, B, corpus.V)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, index):
        a, b, _ = index.indices(self.shape[0])
        c = self.corpus(a, b)
        out = np.zeros(c.shape + (self.V,), np.float32)
        np.put_along_axis(out, c[..., None].astype(np.intp), 1.0, axis=-1)
        return out


class Targets:
    """targets (T, B) int64 read by slices: the next step's codes."""

    def __init__(self, corpus, T):
        self.corpus, self.shape = corpus, (T, B)

    def __getitem__(self, index):
        a, b, _ = index.indices(self.shape[0])
        return self.corpus(a + 1, b + 1).astype(np.int64)


# -- one run, in its own process ------------------------------------------------------

def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def params0(V):
    from bpttgen.generated import lstm

    return lstm.init_params(dict(I=V, H=H, O=V), seed=0, dtype=np.float32)


def run_bpttgen(method, T, budget):
    from bpttgen.generated import lstm

    corpus = Corpus()
    V = corpus.V
    params = params0(V)
    x, y = OneHot(corpus, T), Targets(corpus, T)
    kw = {"full": dict(), "sqrt": dict(algorithm="checkpoint"),
          "binomial": dict(algorithm="checkpoint", memory_limit=budget)}[method]
    warm = 64
    lstm.loss_and_grads(params, x[:warm], y[:warm], **kw)  # compile (or load) the kernels
    lstm.free_workspace()
    if method == "full":
        x, y = x[:T], y[:T]  # the whole input in memory, as bptt takes it
    base = rss_now()
    start = time.perf_counter()
    loss, grads = lstm.loss_and_grads(params, x, y, **kw)
    seconds = time.perf_counter() - start
    plan = None
    if method != "full":
        plan = repr(lstm._MODEL._checkpoint_plan(dict(I=V, H=H, O=V), T, B, 4,
                                                 kw.get("memory_limit")))
    return dict(loss=loss, seconds=seconds, base=base, plan=plan,
                announced=lstm.memory(dict(I=V, H=H, O=V), T, B, np.float32, **kw))


def run_stream(T, k):
    from bpttgen.generated import lstm

    corpus = Corpus()
    V = corpus.V
    trainer = lstm.Trainer(dict(I=V, H=H, O=V), algorithm="tbptt", k1=k, k2=k, lr=1e-9)
    x, y = OneHot(corpus, T), Targets(corpus, T)
    chunk = 4096

    def chunks(lo=0, hi=T):
        for a in range(lo, hi, chunk):
            b = min(hi, a + chunk)
            yield x[a:b], y[a:b]

    trainer.fit_stream(chunks(0, 2 * k), progress=False)  # compile
    base = rss_now()
    start = time.perf_counter()
    loss = trainer.fit_stream(chunks(), progress=False)
    return dict(loss=loss, seconds=time.perf_counter() - start, base=base)


def segment_length(T):
    """The divisor of T nearest sqrt(T) (JAX's scan over segments needs equal ones)."""
    divisors = [d for d in range(1, T + 1) if T % d == 0]
    return min(divisors, key=lambda d: abs(d - T ** 0.5))


def run_jax(T):
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
    import jax
    import jax.numpy as jnp

    corpus = Corpus()
    V, codes = corpus.V, corpus(0, T + 1)
    p = {k: jnp.asarray(v) for k, v in params0(V).items()}
    L = segment_length(T)
    Wx = jnp.concatenate([p[f"W_{g}"] for g in "ifgo"])
    Wh = jnp.concatenate([p[f"U_{g}"] for g in "ifgo"])
    b = jnp.concatenate([p[f"b_{g}"] for g in "ifgo"])
    weights = (Wx, Wh, b, p["W_y"], p["b_y"])

    def loss_fn(weights, tok, tgt):
        Wx, Wh, b, Wy, by = weights

        def step(carry, inp):
            h, c = carry
            t, y = inp
            gates = Wx[:, t].T + h @ Wh.T + b  # the one-hot product is a column gather
            i, f, g, o = jnp.split(gates, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            z = h @ Wy.T + by
            logp = jax.nn.log_softmax(z)
            return (h, c), -jnp.take_along_axis(logp, y[:, None], axis=1).sum()

        @jax.checkpoint
        def segment(carry, inp):
            carry, losses = jax.lax.scan(step, carry, inp)
            return carry, losses.sum()

        zero = jnp.zeros((B, H), jnp.float32)
        _, losses = jax.lax.scan(segment, (zero, zero),
                                 (tok.reshape(T // L, L, B), tgt.reshape(T // L, L, B)))
        return losses.sum() / (T * B)

    tok = jnp.asarray(codes[:-1].astype(np.int32))
    tgt = jnp.asarray(codes[1:].astype(np.int32))
    compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(weights, tok, tgt).compile()
    base = rss_now()
    start = time.perf_counter()
    loss, grads = compiled(weights, tok, tgt)
    jax.block_until_ready(grads)
    return dict(loss=float(loss), seconds=time.perf_counter() - start, base=base,
                plan=f"{T // L} segments of {L} steps")


def run_torch(T):
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    torch.set_num_threads(os.cpu_count())
    corpus = Corpus()
    V, codes = corpus.V, corpus(0, T + 1)
    p = {k: torch.from_numpy(v) for k, v in params0(V).items()}
    lstm = torch.nn.LSTM(V, H)
    readout = torch.nn.Linear(H, V)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.cat([p[f"W_{g}"] for g in "ifgo"]))
        lstm.weight_hh_l0.copy_(torch.cat([p[f"U_{g}"] for g in "ifgo"]))
        lstm.bias_ih_l0.copy_(torch.cat([p[f"b_{g}"] for g in "ifgo"]))
        lstm.bias_hh_l0.zero_()
        readout.weight.copy_(p["W_y"])
        readout.bias.copy_(p["b_y"])
    L = segment_length(T)
    tok = torch.from_numpy(codes[:-1].astype(np.int64))
    tgt = torch.from_numpy(codes[1:].astype(np.int64))

    def segment(a, h, c):
        x = F.one_hot(tok[a:a + L], V).float()
        out, (h, c) = lstm(x, (h, c))
        z = readout(out)
        return F.cross_entropy(z.reshape(-1, V), tgt[a:a + L].reshape(-1),
                               reduction="sum"), h, c

    def call():
        h = c = torch.zeros(1, B, H)
        total = 0.0
        for a in range(0, T, L):
            part, h, c = checkpoint(segment, a, h, c, use_reentrant=False)
            total = total + part
        loss = total / (T * B)
        loss.backward()
        return float(loss)

    # warm-up: one segment forward and backward (PyTorch's first call sets up its
    # kernels), then fresh gradients
    part, _, _ = segment(0, torch.zeros(1, B, H), torch.zeros(1, B, H))
    part.backward()
    for p_ in list(lstm.parameters()) + list(readout.parameters()):
        p_.grad = None
    base = rss_now()
    start = time.perf_counter()
    loss = call()
    return dict(loss=loss, seconds=time.perf_counter() - start, base=base,
                plan=f"{T // L} segments of {L} steps")


def child(method, T, budget):
    if method == "jax-checkpoint":
        out = run_jax(T)
    elif method == "torch-checkpoint":
        out = run_torch(T)
    elif method == "stream":
        out = run_stream(T, 64)
    else:
        out = run_bpttgen(method, T, budget)
    out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))


# -- the table ------------------------------------------------------------------------

def cpu_line():
    model, flags = "?", ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = " ".join(sorted(x for x in line.split() if x.startswith("avx")))
    return f"{model}, {os.cpu_count()} cores, {flags}"


def plot(rows, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    mem, per = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for method in METHODS:
        pts = sorted((r["T"], r) for r in rows if r["method"] == method and "peak" in r)
        if not pts:
            continue
        Ts = [t for t, _ in pts]
        mem.loglog(Ts, [r["peak"] / 2 ** 20 for _, r in pts], "o-", label=method)
        per.loglog(Ts, [r["seconds"] / t * 1e6 for t, r in pts], "o-", label=method)
    mem.set(xlabel="T (steps)", ylabel="peak resident memory (MiB)",
            title=f"LSTM H={H}, B={B}, float32")
    per.set(xlabel="T (steps)", ylabel="time per step (us)", title="loss + all gradients")
    mem.legend(fontsize=8)
    mem.grid(True, which="both", alpha=0.3)
    per.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    global H, B
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", default="1000,10000,100000,1000000",
                    help="sequence lengths, comma-separated")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--stream-T", default="100000,1000000,10000000",
                    help="the stream method's lengths (default 1e5, 1e6, 1e7)")
    ap.add_argument("--budget", type=float, default=64,
                    help="memory_limit of the binomial method, MiB (default 64)")
    ap.add_argument("--max-full-gib", type=float, default=6.0,
                    help="skip full storage where memory() says it needs more")
    ap.add_argument("--plot", default=None, help="write the log-log plot to this PNG")
    ap.add_argument("--json", default=None, help="write the rows as JSON")
    ap.add_argument("--hidden", type=int, default=H,
                    help=f"the LSTM's H (default {H}; a smaller one makes a 10^7-step "
                    "stream affordable: memory's flatness does not depend on it)")
    ap.add_argument("--batch", type=int, default=B, help=f"B streams (default {B})")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    H, B = args.hidden, args.batch
    budget = int(args.budget * 2 ** 20)
    if args.child:
        return child(args.child[0], int(float(args.child[1])), budget)
    Ts = [int(float(t)) for t in args.T.split(",")]
    methods = args.methods.split(",")
    print(f"# {cpu_line()}")
    print(f"# LSTM H={H}, B={B}, V=65, float32; loss and all gradients over T steps, once")
    print(f"{'method':17} {'T':>8} {'s':>8} {'us/step':>8} {'peak MiB':>9} "
          f"{'over base':>9} {'announced':>9}  loss  plan")
    runs = [(T, m) for T in Ts for m in methods if m != "stream"]
    if "stream" in methods:
        runs += [(int(float(T)), "stream") for T in args.stream_T.split(",")]
    rows = []
    for T, method in runs:
        if True:
            row = dict(method=method, T=T)
            if method == "full":
                from bpttgen.generated import lstm

                need = lstm.memory(dict(I=65, H=H, O=65), T, B, np.float32) + T * B * 65 * 4
                if need > args.max_full_gib * 2 ** 30:
                    print(f"{method:17} {T:>8} skipped: needs {need / 2 ** 30:.1f} GiB")
                    continue
            proc = subprocess.run([sys.executable, __file__, "--child", method, str(T),
                                   "--budget", str(args.budget), "--hidden", str(H),
                                   "--batch", str(B)],
                                  capture_output=True, text=True)
            if proc.returncode:
                print(f"{method:17} {T:>8} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            rows.append(row)
            announced = row.get("announced")
            print(f"{method:17} {T:>8} {row['seconds']:8.2f} "
                  f"{row['seconds'] / T * 1e6:8.1f} {row['peak'] / 2 ** 20:9.0f} "
                  f"{(row['peak'] - row['base']) / 2 ** 20:9.0f} "
                  f"{'' if announced is None else f'{announced / 2 ** 20:9.0f}':>9}  "
                  f"{row['loss']:.4f}  {row.get('plan') or ''}", flush=True)
    exact = [r for r in rows if r["method"] != "stream"]
    for T in Ts:
        losses = [r["loss"] for r in exact if r["T"] == T]
        if losses and max(losses) - min(losses) > 1e-4 * max(losses):
            print(f"# T={T}: the exact methods' losses disagree: {losses}")
    if args.plot:
        plot(rows, args.plot)
        print(f"# plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
