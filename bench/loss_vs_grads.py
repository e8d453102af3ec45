"""loss() (forward and loss phase) against loss_and_grads() of the same call: one
process, 0.5 s blocks of each in turn after a 0.25 s pause, float32, the default split
rule; prints the medians and loss/loss_and_grads.

    python bench/loss_vs_grads.py [--models elman,lstm,gru] [--rounds 3]
                                  [--sizes B,T,I,H,O ...]
"""

import argparse
import importlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from frameworks import fmt_load, problem, source_version  # noqa: E402


def block(call, seconds=0.5, pause=0.25):
    """The median time of ``call`` over a block of calls after a pause and one untimed
    call (frameworks.timed_rounds explains both)."""
    import numpy as np

    time.sleep(pause)
    call()
    times, end = [], time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < end:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None):
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="elman,lstm,gru")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", nargs="*", default=["32,128,64,128,64", "64,128,256,512,256"])
    args = ap.parse_args(argv)
    print(f"# python bench/loss_vs_grads.py --models {args.models} --rounds {args.rounds}; "
          f"{source_version()}; load {fmt_load()}", flush=True)
    for model in args.models.split(","):
        module = importlib.import_module(f"bpttgen.generated.{model}")
        for B, T, I, H, O in (tuple(map(int, s.split(","))) for s in args.sizes):
            params, x, targets = problem(np, module, model, B, T, I, H, O, np.float32)
            both, alone = [], []
            for _ in range(args.rounds):
                both.append(block(lambda: module.loss_and_grads(params, x, targets)))
                alone.append(block(lambda: module.loss(params, x, targets)))
            a, b = 1e3 * float(np.median(both)), 1e3 * float(np.median(alone))
            print(f"{model:6s} {B},{T},{I},{H},{O}: loss_and_grads {a:8.2f} ms  loss "
                  f"{b:8.2f} ms  loss/loss_and_grads {b / a:.2f}", flush=True)


if __name__ == "__main__":
    main()
