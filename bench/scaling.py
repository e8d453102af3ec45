"""Time of one loss + gradients call against the sequence length T, per algorithm.

Seed 000: accumulated BPTT is O(T), naive BPTT (each step's error propagated alone
through all earlier steps) O(T^2), truncated BPTT(k1, k2) O(T k2 / k1). For a
generated module (Elman by default, float32, (B, I, H, O) = (32, 64, 128, 64))
this times bptt, naive and tbptt(k1, k2) at T = 32 .. 2048 (doubling), naive only
while its predicted time stays under --naive-limit seconds, checks at every T
where naive ran that its gradients equal bptt's, fits the log-log slope of each
curve, and writes a log-log plot.

    python bench/scaling.py [--model elman] [--threads 2] [--tmax 2048] [--out DIR]
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from frameworks import fmt_load, machine, pin_threads, source_version  # noqa: E402

TBPTT = ((1, 16), (16, 32))  # (k1, k2): seed 000's m-step truncation, and k1 = k2 / 2


def median_seconds(fn, repeats, budget):
    """Median of up to `repeats` calls (at least one), stopping once `budget`
    seconds are spent."""
    times, start = [], time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start < budget):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def slope(np, Ts, secs):
    """Least-squares slope of log(time) against log(T) (1: linear, 2: quadratic)."""
    if len(Ts) < 2:
        return float("nan")
    return float(np.polyfit(np.log(Ts), np.log(secs), 1)[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="elman")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", default="32,64,128,64", help="B,I,H,O")
    ap.add_argument("--tmin", type=int, default=32)
    ap.add_argument("--tmax", type=int, default=2048)
    ap.add_argument("--naive-limit", type=float, default=60.0,
                    help="run naive at T only if its predicted time is below this (s)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"),
                    help="folder for scaling.csv / .md / .png ('' for none)")
    args = ap.parse_args(argv)
    pin_threads(args.threads)

    import importlib

    import numba
    import numpy as np

    module = importlib.import_module(f"bpttgen.generated.{args.model}")
    B, I, H, O = (int(v) for v in args.size.split(","))
    sizes = {"I": I, "H": H, "O": O}
    algos = ["bptt", "naive"] + [f"tbptt({k1},{k2})" for k1, k2 in TBPTT]
    kwargs = {"bptt": {}, "naive": {"algorithm": "naive"}}
    kwargs.update({f"tbptt({k1},{k2})": {"algorithm": "tbptt", "k1": k1, "k2": k2}
                   for k1, k2 in TBPTT})
    header = [f"machine: {machine()}; threads pinned to {args.threads}",
              f"versions: numpy {np.__version__}, numba {numba.__version__}; bpttgen "
              f"{source_version()}",
              "command: python bench/scaling.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              f"model {args.model}, float32, (B, I, H, O) = ({B}, {I}, {H}, {O})",
              f"load average at start: {fmt_load()}"]
    for line in header:
        print("# " + line, flush=True)

    params = module.init_params(sizes, seed=0)
    rng = np.random.default_rng(0)
    Ts, T = [], args.tmin
    while T <= args.tmax:
        Ts.append(T)
        T *= 2
    module.loss_and_grads(params, np.zeros((4, B, I), np.float32),
                          np.zeros((4, B), np.int64))  # load the compiled kernels
    secs = {a: {} for a in algos}
    naive_err = {}
    print(f"{'T':>5} " + " ".join(f"{a + ' ms':>16}" for a in algos)
          + f" {'naive/bptt':>10} {'(T+1)/2':>8} {'naive err':>9}", flush=True)
    for T in Ts:
        x = rng.standard_normal((T, B, I)).astype(np.float32)
        targets = rng.integers(0, O, (T, B))
        for a in algos:
            predicted = 0.0
            if secs[a]:
                last_T = max(secs[a])
                predicted = secs[a][last_T] * (T / last_T) ** (2 if a == "naive" else 1)
            if a == "naive" and predicted > args.naive_limit:
                continue
            fn = lambda: module.loss_and_grads(params, x, targets, **kwargs[a])  # noqa: E731
            if predicted < 1.0:
                fn()  # warm-up (the long naive calls need none: kernels are loaded)
            secs[a][T] = median_seconds(fn, 7, 3.0)
        if T in secs["naive"]:
            _, g_b = module.loss_and_grads(params, x, targets)
            _, g_n = module.loss_and_grads(params, x, targets, algorithm="naive")
            naive_err[T] = max(float(np.max(np.abs(g_n[k] - g_b[k])) / np.max(np.abs(g_b[k])))
                               for k in g_b)
        cells = " ".join(f"{1e3 * secs[a][T]:>16.1f}" if T in secs[a] else f"{'-':>16}"
                         for a in algos)
        ratio = (f"{secs['naive'][T] / secs['bptt'][T]:>10.1f} {(T + 1) / 2:>8.1f} "
                 f"{naive_err[T]:>9.1e}") if T in secs["naive"] else ""
        print(f"{T:>5} {cells} {ratio}", flush=True)
    slopes = {a: slope(np, sorted(secs[a]), [secs[a][t] for t in sorted(secs[a])])
              for a in algos}
    # The small-T end is dominated by per-call overhead: fit the upper half as well.
    upper = {a: slope(np, [t for t in sorted(secs[a]) if t >= 256],
                      [secs[a][t] for t in sorted(secs[a]) if t >= 256]) for a in algos}
    print("log-log slope (all T / T >= 256): " + ", ".join(
        f"{a} {slopes[a]:.2f} / {upper[a]:.2f}" for a in algos))
    print(f"# load average at end: {fmt_load()}")
    if args.out:
        write(args.out, args.model, header, Ts, algos, secs, slopes, upper, naive_err)
    return 0


def write(folder, model, header, Ts, algos, secs, slopes, upper, naive_err):
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"scaling_{model}")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["T"] + [f"{a}_ms" for a in algos] + ["naive_grad_err"])
        for T in Ts:
            w.writerow([T] + [f"{1e3 * secs[a][T]:.3f}" if T in secs[a] else "" for a in algos]
                       + [f"{naive_err[T]:.2e}" if T in naive_err else ""])
    lines = [f"- {h}" for h in header] + [
        "", "| T | " + " | ".join(f"{a} ms" for a in algos) + " | naive/bptt | (T+1)/2 |",
        "|---:|" + "---:|" * (len(algos) + 2)]
    for T in Ts:
        ratio = (f"{secs['naive'][T] / secs['bptt'][T]:.1f} | {(T + 1) / 2:.1f}"
                 if T in secs["naive"] else "- | -")
        lines.append(f"| {T} | " + " | ".join(
            f"{1e3 * secs[a][T]:.1f}" if T in secs[a] else "-" for a in algos)
            + f" | {ratio} |")
    lines += ["", "log-log slope, all T / T >= 256: " + ", ".join(
        f"{a} {slopes[a]:.2f} / {upper[a]:.2f}" for a in algos)]
    if naive_err:
        lines.append(f"naive vs bptt gradients (float32): max rel. error "
                     f"{max(naive_err.values()):.1e}")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for a in algos:
        t = sorted(secs[a])
        ax.loglog(t, [secs[a][k] for k in t], "o-", label=f"{a} (slope {slopes[a]:.2f})")
    t0 = Ts[0]
    ref = secs["bptt"][t0]
    ax.loglog(Ts, [ref * T / t0 for T in Ts], "k:", lw=1, label="O(T)")
    ax.loglog(Ts, [secs["naive"][t0] * (T / t0) ** 2 for T in Ts], "k--", lw=1,
              label="O(T^2)")
    ax.set_ylim(top=max(max(v.values()) for v in secs.values()) * 3)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("seconds per loss + gradients")
    ax.set_title(f"{model}, float32: {header[3].split(', ', 2)[2]}", fontsize=9)
    ax.set_xticks(Ts)
    ax.set_xticklabels([str(T) for T in Ts])
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
