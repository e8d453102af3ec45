"""loss() (forward and loss phase) against loss_and_grads() of the same call: one
process, 0.5 s blocks of each in turn after a 0.25 s pause (frameworks.timed_rounds),
float32, the default split rule; prints the medians and loss/loss_and_grads.

    python bench/loss_vs_grads.py [--models elman,lstm,gru] [--rounds 3]
                                  [--sizes B,T,I,H,O ...]
"""

import argparse
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from frameworks import fmt_load, problem, source_version, timed_rounds  # noqa: E402


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
            times = timed_rounds({"both": lambda: module.loss_and_grads(params, x, targets),
                                  "alone": lambda: module.loss(params, x, targets)},
                                 args.rounds, args.rounds, 0.0)
            a, b = (1e3 * float(np.median(times[k])) for k in ("both", "alone"))
            print(f"{model:6s} {B},{T},{I},{H},{O}: loss_and_grads {a:8.2f} ms  loss "
                  f"{b:8.2f} ms  loss/loss_and_grads {b / a:.2f}", flush=True)


if __name__ == "__main__":
    main()
