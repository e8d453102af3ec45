"""RTRL's cost against BPTT as H grows, and ARTBP against truncated and full BPTT on
the adding problem.

1. Cost per step (seed 001): one loss + gradients call of a generated module
   (float32, B = 1, I = O = 8) with algorithm="rtrl" (T = 16) and "bptt" (T = 512,
   to amortise the per-call overhead), divided by T, for H = 8 .. 128. RTRL's
   sensitivities are O(H P) numbers and cost O(H^2 P) per step, P = O(H^2)
   parameters: slope 4 on a log-log plot, against 2 for BPTT (and less while
   per-step overhead dominates, at small H and B = 1).
2. Gradient estimates at fixed weights (seed 003): an LSTM with a loss at the last
   step of the adding problem; ARTBP with truncation probability c and TBPTT(k, k)
   with k = 1/c at a random phase, the same mean truncation length. The relative
   error of the mean of n estimates against the BPTT gradient, as n grows: ARTBP's
   falls as 1/sqrt(n) (unbiased), TBPTT's stops at its bias. Also the variance of
   one estimate.
3. Training curves on the adding problem (a GRU and an LSTM): BPTT, online
   TBPTT(k, k), online ARTBP(c), same data, initial weights, minibatches and
   optimizer, three seeds; held-out loss after each epoch.

    python bench/rtrl.py [--threads 2] [--quick] [--out bench/results]
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from frameworks import fmt_load, machine, pin_threads  # noqa: E402

TRAINED = ("gru", "lstm")  # the models of the training curves


def median_seconds(fn, repeats, budget):
    """Median of up to `repeats` calls (at least 3), stopping once `budget` s are spent."""
    times, start = [], time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def slope(np, xs, ys):
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0]) if len(xs) > 1 else float("nan")


# -- 1. cost per step ------------------------------------------------------------------
def cost_per_step(np, model, Hs, B=1, IO=8, steps=None):
    """Seconds per step of each algorithm: one call over T steps, divided by T. BPTT
    runs over more steps (its per-call overhead would hide its O(H^2) otherwise)."""
    import importlib

    module = importlib.import_module(f"bpttgen.generated.{model}")
    rng = np.random.default_rng(0)
    steps = steps or {"bptt": 512, "rtrl": 16}
    rows = []
    for H in Hs:
        sizes = {"I": IO, "H": H, "O": IO}
        params = module.init_params(sizes, seed=0)
        NP, _ = module.rtrl_directions(sizes)
        row = dict(model=model, H=H, NP=NP)
        for algorithm, T in steps.items():
            x = rng.standard_normal((T, B, IO)).astype(np.float32)
            targets = rng.integers(0, IO, (T, B))
            fn = lambda: module.loss_and_grads(params, x, targets,  # noqa: E731
                                               algorithm=algorithm)
            fn()  # compile / warm up
            row[algorithm] = median_seconds(fn, 9, 4.0) / T
        _, g_b = module.loss_and_grads(params, x, targets)
        _, g_r = module.loss_and_grads(params, x, targets, algorithm="rtrl")
        row["err"] = max(float(np.max(np.abs(g_r[k] - g_b[k])) / (np.max(np.abs(g_b[k])) or 1))
                         for k in g_b)
        rows.append(row)
        print(f"{model:6} H={H:4} NP={NP:7}  bptt {1e6 * row['bptt']:9.1f} us/step  rtrl "
              f"{1e6 * row['rtrl']:11.1f} us/step  ratio {row['rtrl'] / row['bptt']:8.1f}  "
              f"float32 grad diff {row['err']:.1e}", flush=True)
    return rows


# -- 2. estimates at fixed weights ---------------------------------------------------
def estimates(np, module, c, samples, T, H, seed=0):
    """Relative error of the mean of n estimates vs n, and the variance of one."""
    from bpttgen.codegen.app import tasks

    task = tasks.adding(T, 16, classes=5, seed=seed)
    params = module.init_params({"I": 2, "H": H, "O": 5}, seed=seed, dtype=np.float64)
    x, y, mask = task.x.astype(np.float64), task.targets, task.mask
    _, full = module.loss_and_grads(params, x, y, mask=mask)
    names = [n for n in module.RTRL_PARAMS]
    flat = lambda g: np.concatenate([g[n].ravel() for n in names])  # noqa: E731
    full = flat(full)
    k = int(round(1 / c))
    rng = np.random.default_rng(seed)
    draws = {"ARTBP": [], "TBPTT": []}
    for _ in range(samples):
        cut = rng.random(T) < c
        draws["ARTBP"].append(flat(module.loss_and_grads(
            params, x, y, mask=mask, algorithm="artbp", c=c, truncate=cut)[1]))
        phase = rng.integers(k)
        draws["TBPTT"].append(flat(module.loss_and_grads(
            params, x, y, mask=mask, algorithm="artbp", c=0.0,
            truncate=(np.arange(T) - phase) % k == 0)[1]))
    ns = [n for n in (1, 3, 10, 30, 100, 300, 1000, 3000, 10000) if n <= samples]
    out = {"n": ns, "k": k}
    norm = np.linalg.norm(full)
    for name, d in draws.items():
        d = np.array(d)
        running = np.cumsum(d, axis=0)
        out[name] = [float(np.linalg.norm(running[n - 1] / n - full) / norm) for n in ns]
        out[name + "_var"] = float(d.var(axis=0, ddof=1).sum() / norm ** 2)
    return out


# -- 3. training curves -------------------------------------------------------------------
def training(np, module, T, H, c, epochs, n_train, n_test, lr, seeds):
    """Held-out loss after each epoch, per algorithm and seed (the seed draws the data,
    the initial weights, the minibatch order and ARTBP's cuts)."""
    from bpttgen.codegen.app import tasks

    k = int(round(1 / c))
    sizes = {"I": 2, "H": H, "O": 5}
    runs = {"BPTT": dict(), f"TBPTT({k},{k})": dict(algorithm="tbptt", k1=k, k2=k),
            f"ARTBP(c={c:g})": dict(algorithm="artbp", c=c)}
    curves = {name: dict(loss=[], seconds=0.0, updates=0) for name in runs}
    for seed in range(seeds):
        data = tasks.adding(T, n_train + n_test, classes=5, seed=seed)
        train, test = data.split(n_test)
        for name, kw in runs.items():
            tr = module.Trainer(sizes, optimizer="adam", lr=lr, seed=seed, clip=5.0, **kw)
            held_out = lambda: float(tr.loss_and_grads(  # noqa: E731
                test.x, test.targets, mask=test.mask)[0])
            losses = [held_out()]

            def after_epoch(trainer, info):
                if info["event"] == "epoch":
                    losses.append(held_out())

            start = time.perf_counter()
            tr.fit(train.x, train.targets, epochs=epochs, batch_size=32, mask=train.mask,
                   progress=False, callback=after_epoch)
            curves[name]["loss"].append(losses)
            curves[name]["seconds"] += time.perf_counter() - start
            curves[name]["updates"] += tr.steps
            print(f"{module.NAME} seed {seed} {name:14} held-out loss "
                  + " ".join(f"{v:.3f}" for v in losses)
                  + f"  ({tr.steps} updates)", flush=True)
    return curves, data.baseline


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    ap.add_argument("--out", default=os.path.join(HERE, "results"),
                    help="folder for rtrl.csv / .md / .png ('' for none)")
    args = ap.parse_args(argv)
    pin_threads(args.threads)

    import importlib

    import numba
    import numpy as np

    quick = args.quick
    header = [f"machine: {machine()}; threads pinned to {args.threads}",
              f"versions: numpy {np.__version__}, numba {numba.__version__}",
              "command: python bench/rtrl.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              f"load average at start: {fmt_load()}"]
    for line in header:
        print("# " + line, flush=True)

    cost = cost_per_step(np, "elman", [8, 16] if quick else [8, 16, 32, 64, 128])
    cost += cost_per_step(np, "lstm", [8, 16] if quick else [8, 16, 32, 64])
    lstm = importlib.import_module("bpttgen.generated.lstm")
    T, c = 40, 0.1
    est = estimates(np, lstm, c, 30 if quick else 3000, T, H=8)
    print(f"relative error of the mean of n estimates (n = {est['n']}):")
    for name in ("ARTBP", "TBPTT"):
        print(f"  {name:6} " + " ".join(f"{v:.3f}" for v in est[name])
              + f"; variance of one estimate / |grad|^2 {est[name + '_var']:.2f}")
    trained = {}
    for model in TRAINED:
        trained[model] = training(np, importlib.import_module(f"bpttgen.generated.{model}"), T, H=16,
                                  c=c, epochs=2 if quick else 20,
                                  n_train=256 if quick else 2000,
                                  n_test=128 if quick else 500, lr=0.01,
                                  seeds=1 if quick else 3)
    header.append(f"load average at end: {fmt_load()}")
    print("# " + header[-1])
    if args.out:
        write(args.out, header, cost, est, trained, T, c)
    return 0


def write(folder, header, cost, est, trained, T, c):
    import csv

    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, "rtrl")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "H", "NP", "bptt_us_per_step", "rtrl_us_per_step", "ratio"])
        for r in cost:
            w.writerow([r["model"], r["H"], r["NP"], f"{1e6 * r['bptt']:.2f}",
                        f"{1e6 * r['rtrl']:.2f}", f"{r['rtrl'] / r['bptt']:.1f}"])
    slopes = {}
    for model in dict.fromkeys(r["model"] for r in cost):
        rs = [r for r in cost if r["model"] == model and r["H"] >= 16]
        slopes[model] = {a: slope(np, [r["H"] for r in rs], [r[a] for r in rs])
                         for a in ("bptt", "rtrl")}
    lines = [f"- {h}" for h in header] + [
        "", "| model | H | P (directions) | BPTT us/step | RTRL us/step | RTRL/BPTT |",
        "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['H']} | {r['NP']} | {1e6 * r['bptt']:.1f} | "
              f"{1e6 * r['rtrl']:.1f} | {r['rtrl'] / r['bptt']:.0f} |" for r in cost]
    lines += ["", "log-log slope over H >= 16: " + "; ".join(
        f"{m} BPTT {s['bptt']:.2f}, RTRL {s['rtrl']:.2f}" for m, s in slopes.items()), ""]
    lines += [f"Gradient estimates, LSTM H=8, adding problem T={T}, loss at the last step, "
              f"c={c}, k={est['k']}: relative error of the mean of n estimates vs BPTT", "",
              "| n | " + " | ".join(str(n) for n in est["n"]) + " | variance / norm^2 |",
              "| --- |" + " ---: |" * (len(est["n"]) + 1)]
    for name in ("ARTBP", "TBPTT"):
        k = est["k"]
        label = f"ARTBP(c={c:g})" if name == "ARTBP" else f"TBPTT({k},{k}) random phase"
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in est[name])
                     + f" | {est[name + '_var']:.2f} |")
    for model, (curves, baseline) in trained.items():
        seeds = len(next(iter(curves.values()))["loss"])
        epochs = len(next(iter(curves.values()))["loss"][0]) - 1
        some = [i for i in (1, 5, 10, 15, 20) if i <= epochs]
        lines += ["", f"Training, {model} H=16, adding problem T={T}, {seeds} seeds (data, "
                  "initial weights, minibatch order, cuts): held-out loss, mean over the "
                  f"seeds (no memory: {baseline:.3f})", "",
                  "| algorithm | updates per run | seconds per run | start | "
                  + " | ".join(f"epoch {i}" for i in some) + " | final, each seed |",
                  "| --- |" + " ---: |" * (4 + len(some))]
        for name, cv in curves.items():
            mean = np.mean(cv["loss"], axis=0)
            lines.append(f"| {name} | {cv['updates'] // seeds} | {cv['seconds'] / seeds:.1f} "
                         f"| {mean[0]:.3f} | " + " | ".join(f"{mean[i]:.3f}" for i in some)
                         + " | " + ", ".join(f"{run[-1]:.3f}" for run in cv["loss"]) + " |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    axes = axes.ravel()
    ax = axes[0]
    for model, marker in zip(slopes, "os"):
        rs = [r for r in cost if r["model"] == model]
        Hs = [r["H"] for r in rs]
        for a, style in (("bptt", "--"), ("rtrl", "-")):
            ax.loglog(Hs, [1e6 * r[a] for r in rs], marker + style,
                      label=f"{model} {a.upper()} (slope {slopes[model][a]:.1f})")
    Hs = sorted({r["H"] for r in cost})
    top = max((r for r in cost if r["model"] == "elman"), key=lambda r: r["H"])
    ax.loglog(Hs, [1e6 * top["rtrl"] * (h / top["H"]) ** 4 for h in Hs], "k:", lw=1,
              label="O(H^4)")
    ax.loglog(Hs, [1e6 * top["bptt"] * (h / top["H"]) ** 2 for h in Hs], "k-.", lw=1,
              label="O(H^2)")
    ax.set_xlabel("hidden size H")
    ax.set_ylabel("microseconds per step (B = 1)")
    ax.set_title("cost per step: RTRL O(H^4) vs BPTT O(H^2)", fontsize=10)
    ax.set_xticks(Hs)
    ax.set_xticklabels([str(h) for h in Hs])
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[1]
    ns = est["n"]
    ax.loglog(ns, est["ARTBP"], "o-", label=f"ARTBP (c={c:g})")
    ax.loglog(ns, est["TBPTT"], "s-", label=f"TBPTT({est['k']},{est['k']}), random phase")
    ax.loglog(ns, [est["ARTBP"][0] / np.sqrt(n) for n in ns], "k:", lw=1, label="1/sqrt(n)")
    ax.set_xlabel("number of estimates averaged, n")
    ax.set_ylabel("|mean - BPTT gradient| / |BPTT gradient|")
    ax.set_title(f"unbiased vs biased (LSTM, adding T={T}, fixed weights)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)

    for ax, (model, (curves, baseline)) in zip(axes[2:], trained.items()):
        for (name, cv), color in zip(curves.items(), ("C0", "C1", "C2")):
            runs = np.array(cv["loss"])
            x = range(runs.shape[1])
            ax.plot(x, runs.mean(axis=0), "o-", ms=3, color=color, label=f"{name}, mean")
            ax.fill_between(x, runs.min(axis=0), runs.max(axis=0), color=color, alpha=0.15)
        ax.axhline(baseline, color="k", ls=":", lw=1, label="no memory")
        ax.set_xlabel("epoch")
        ax.set_ylabel("held-out loss (last step)")
        ax.set_title(f"training, {model} H=16, adding T={T} ({len(runs)} seeds, min-max)",
                     fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
