"""A call split over threads (codegen/runtime/split.py) against the same call unsplit:
one process, blocks of calls with threads=1 and with the default rule in turn
(float32 loss + all gradients, or with --forward the predictions), a pause before each
block so that OpenBLAS's idle threads (which spin 0.1-0.2 s after a product on several
threads) have stopped.

    python bench/split_ab.py [--models elman,lstm,gru] [--threads 2] [--rounds 8]
                             [--seconds 0.5] [--sizes B,T,I,H,O ...] [--forward]

Prints per size the pieces the rule chose, the median over rounds of each block's
median call, unsplit/split (above 1: the split is faster) and the largest relative
difference of the gradients or predictions (float32 rounding where the rule splits).
"""

import argparse
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from frameworks import (SIZES, fmt_load, pin_threads, problem, source_version,  # noqa: E402
                        timed_rounds)

#: Sizes near the rule's edges: the fewest rows, the least work it splits.
EDGE_SIZES = ((32, 128, 16, 64, 16), (32, 32, 16, 64, 16), (64, 64, 32, 64, 32))


def parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="elman,lstm,gru")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=0.5, help="per block")
    ap.add_argument("--pause", type=float, default=0.3, help="s before each block")
    ap.add_argument("--sizes", nargs="*", help="B,T,I,H,O each (default: frameworks.py's "
                    "and three near the rule's edges)")
    ap.add_argument("--forward", action="store_true", help="time forward(), not "
                    "loss_and_grads()")
    return ap


def main(argv=None):
    import numpy as np

    args = parser().parse_args(argv)
    sizes = ([tuple(map(int, s.split(","))) for s in args.sizes] if args.sizes
             else list(SIZES) + list(EDGE_SIZES))
    print(f"# python bench/split_ab.py --models {args.models} --threads {args.threads} "
          f"--rounds {args.rounds}{' --forward' if args.forward else ''}; {source_version()}; "
          f"load {fmt_load()}", flush=True)
    rows = []
    for model in args.models.split(","):
        module = importlib.import_module(f"bpttgen.generated.{model}")
        for B, T, I, H, O in sizes:
            params, x, targets = problem(np, module, model, B, T, I, H, O, np.float32)
            pieces = module._MODEL.pieces(params, T, B, np.float32, forward=args.forward)

            def call(threads):
                if args.forward:
                    return {"y": module.forward(params, x, threads=threads)[0]}
                return module.loss_and_grads(params, x, targets, threads=threads)[1]

            grads = {threads: call(threads) for threads in (1, None)}
            times = timed_rounds({1: lambda: call(1), None: lambda: call(None)}, args.rounds,
                                 args.rounds, 0.0, pause=args.pause, block=args.seconds)
            diff = max(float(np.abs(grads[None][k] - grads[1][k]).max()
                             / np.abs(grads[1][k]).max()) for k in grads[1])
            one, rule = (1e3 * float(np.median(times[k])) for k in (1, None))
            print(f"{model:6s} {B},{T},{I},{H},{O}: pieces {pieces}  unsplit {one:8.2f} ms  "
                  f"split {rule:8.2f} ms  unsplit/split {one / rule:5.2f}  "
                  f"grad diff {diff:.1e}", flush=True)
            rows.append(dict(model=model, sizes=(B, T, I, H, O), pieces=pieces, unsplit=one,
                             split=rule, diff=diff))
    print(f"# load at end {fmt_load()}")
    return rows


if __name__ == "__main__":
    pin_threads(parser().parse_args().threads)  # before NumPy loads its BLAS
    main()
