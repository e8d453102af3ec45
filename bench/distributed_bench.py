"""Data-parallel training on a Dask LocalCluster against one process: time per epoch,
bytes per step and the per-step overhead against the compute.

For Elman, LSTM and GRU at bench/frameworks.py's four sizes (B, T, I, H, O), float32,
bptt, Adam, an epoch of --steps minibatches of B sequences (the parity task's shape
with random inputs and classes):

    1 process x 2 threads   Trainer.fit in this process, BLAS on two threads
    2 workers x 1 thread    Trainer.fit(client=...) on a LocalCluster of two worker
                            processes, one thread each: each minibatch cut in two

Reported per configuration: seconds per epoch (the second of two; the first imports
and warms), and for the cluster, per step: bytes sent (parameters to every worker,
and the numbers of each shard's sequences: the workers hold the data, sent once per
fit, "held") and received (each shard's gradients), the kernels' time (the slower
shard) and the overhead (wall time of the split call less that). Then the
paper model of BENCHMARKS.md: step time on N machines = compute / N + 2 * 4P bytes
at 10 Gb/s, with the compute measured here on one process.

    python bench/distributed_bench.py [--models elman,lstm,gru] [--sizes 8,256,32,32,32 ...]
                                [--steps 8] [--out bench/results]
"""

import argparse
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from frameworks import SIZES  # noqa: E402 (its four sizes; it imports only the stdlib)
LINK = 10e9 / 8  # bytes per second of a 10 Gb/s network


def pin_threads(n):
    """BLAS and Numba threads of this process; before numpy loads. The workers get
    one thread each from the nanny (distributed.nanny.pre-spawn-environ)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)


def data(module, size, steps, seed=0):
    import numpy as np

    B, T, I, H, O = size
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B * steps, I)).astype(np.float32)
    targets = rng.integers(0, O, (T, B * steps))
    return x, targets, {"I": I, "H": H, "O": O}


def epoch_seconds(module, size, steps, client=None):
    """Seconds of the second epoch of a fit of two, and the split call's stats of it."""
    import numpy as np

    x, targets, sizes = data(module, size, steps)
    tr = module.Trainer(sizes, optimizer="adam", lr=1e-3, seed=0, dtype=np.float32)
    marks, stats = [], {}

    def callback(t, info):
        if info["event"] == "epoch":
            marks.append(time.perf_counter())
            if client is not None:
                stats[info["epoch"]] = dict(t.module.stats)
    marks.append(time.perf_counter())
    tr.fit(x, targets, epochs=2, batch_size=size[0], progress=False, callback=callback,
           client=client)
    P = sum(p.size for p in tr.params.values())
    second = None
    if client is not None:
        second = {k: stats[1][k] - stats[0][k] for k in stats[1]}
        second["held"] = stats[0].get("bytes_held", 0)  # the data, once per fit
    return marks[2] - marks[1], second, P


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="elman,lstm,gru")
    p.add_argument("--sizes", nargs="*", default=None, help="B,T,I,H,O ...")
    p.add_argument("--steps", type=int, default=8, help="minibatches per epoch")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    pin_threads(2)
    import importlib

    from distributed import Client, LocalCluster

    # This process's BLAS has its two threads now; the workers it spawns inherit the
    # environment, and must get one each.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS"):
        os.environ[var] = "1"
    sizes = SIZES if not args.sizes else [tuple(int(v) for v in s.split(",")) for s in args.sizes]
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=":0")
    client = Client(cluster, direct_to_workers=True)  # as bpttgen train --workers
    client.wait_for_workers(2)
    env = client.run(lambda: os.environ.get("OPENBLAS_NUM_THREADS"))
    rows = []
    load0 = os.getloadavg()[0]
    for name in args.models.split(","):
        module = importlib.import_module(f"bpttgen.generated.{name}")
        for size in sizes:
            one, _, P = epoch_seconds(module, size, args.steps)
            two, st, _ = epoch_seconds(module, size, args.steps, client)
            calls = st["calls"]  # one split call per step (bptt)
            row = dict(model=name, size=size, P=P, one=one, two=two,
                       sent=(st["bytes_params"] + st["bytes_data"]) / calls,
                       params=st["bytes_params"] / calls, received=st["bytes_results"] / calls,
                       held=st["held"],
                       compute=st["compute"] / calls, overhead=(st["wall"] - st["compute"]) / calls,
                       shard_sum=st["shard_seconds"] / calls)
            rows.append(row)
            print(f"{name} {size}: 1x2 {one:.3f} s/epoch, 2x1 {two:.3f} s/epoch, "
                  f"compute {row['compute'] * 1e3:.1f} ms/step, overhead "
                  f"{row['overhead'] * 1e3:.1f} ms/step, sent {row['sent'] / 1e6:.2f} MB, "
                  f"received {row['received'] / 1e6:.2f} MB", flush=True)
    load1 = os.getloadavg()[0]
    client.close()
    cluster.close()
    text = report(rows, args, env, load0, load1)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "distributed.md")
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"written to {path}")


def _mb(n):
    return f"{n / 1e6:.2f}"


def report(rows, args, env, load0, load1):
    import numba
    import numpy as np

    lines = [
        f"Machine: `nproc` = {os.cpu_count()}, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, numpy {np.__version__}, numba "
        f"{numba.__version__}; workers' OPENBLAS_NUM_THREADS {sorted(set(env.values()))}; "
        f"load average {load0:.1f} before, {load1:.1f} after. float32, bptt, Adam, "
        f"{args.steps} minibatches of B sequences per epoch.",
        "",
        "| model (B,T,I,H,O) | P | 1 process x 2 threads s/epoch | 2 workers x 1 thread "
        "s/epoch | speed-up | sent MB/step (params) | received MB/step | held MB/fit | "
        "compute ms/step | "
        "overhead ms/step | overhead/compute |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} {','.join(map(str, r['size']))} | {r['P']} | {r['one']:.3f} | "
            f"{r['two']:.3f} | {r['one'] / r['two']:.2f}x | {_mb(r['sent'])} "
            f"({_mb(r['params'])}) | {_mb(r['received'])} | {_mb(r['held'])} | "
            f"{r['compute'] * 1e3:.1f} | "
            f"{r['overhead'] * 1e3:.1f} | {100 * r['overhead'] / r['compute']:.1f}% |")
    lines += [
        "",
        "Paper model: step time on N machines t_N = C / N + X, C the compute of one "
        "step on one machine (here: the 1-process epoch / steps), X = 2 x 4P bytes at "
        "10 Gb/s (the parameters out, the gradients back; float32). Speed-up C / t_N; "
        "it pays (t_N < C) while X < C (1 - 1/N).",
        "",
        "| model (B,T,I,H,O) | C ms | X ms (10 Gb/s) | X / C | speed-up N=2 | N=4 | N=8 | "
        "N=16 | limit C/X | measured overhead ms (LocalCluster) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        C = r["one"] / args.steps
        X = 2 * 4 * r["P"] / LINK
        speed = [C / (C / n + X) for n in (2, 4, 8, 16)]
        lines.append(
            f"| {r['model']} {','.join(map(str, r['size']))} | {C * 1e3:.1f} | {X * 1e3:.2f} | "
            f"{X / C:.3f} | " + " | ".join(f"{s:.2f}x" for s in speed) +
            f" | {C / X:.0f}x | {r['overhead'] * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
