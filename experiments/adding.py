"""Seed 000's conclusion on long dependencies: the adding problem at T = 50, 100,
200, learned by an Elman RNN, an LSTM and a GRU with full (accumulated) BPTT and
with truncated BPTT(k1, k2).

The task (Hochreiter & Schmidhuber; bpttgen.codegen.app.tasks.adding): two input channels, a
random value in [0, 1] and a marker; one marked value in each half of the
sequence; at the last step the model names the sum, binned into --classes equal
classes (softmax cross-entropy on the last step only, a mask on the others). The
first marked value sits between T/2 and T steps before the answer.

Truncated BPTT(k1, k2) with k2 < T/2 never carries the first value's error back
to the step where it was read. The table gives the accuracy a model reaches
knowing only the second value ("second value only", the best guess from it), the
no-memory bound (the most frequent class), and each run's test accuracy. A run
"learned the long dependency" when its test accuracy is above the second-value
bound by more than half the gap to 100%: it must have kept the first value for
T/2 to T steps. (A gated cell can do that even when trained with truncation: the
rule "add a marked value to the cell and keep it" is learned from the second
marker inside the window and, the weights being shared over time, applies to
the first one as well.)

    python experiments/adding.py [--lengths 50,100,200] [--quick]
"""

import argparse
import importlib
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import load_average, pin_threads, source_version  # noqa: E402

if __name__ == "__main__":
    pin_threads(sys.argv)

import numpy as np  # noqa: E402

RESULTS = os.path.join(os.path.dirname(HERE), "bench", "results")
sys.path.insert(0, os.path.dirname(HERE))

from bpttgen.codegen.app import tasks  # noqa: E402

MODELS = ("elman", "lstm", "gru")
LABEL = {"elman": "RNN (Elman)", "lstm": "LSTM", "gru": "GRU"}


def bounds(classes, n=400_000, bins=1000, seed=1):
    """(most-frequent-class accuracy, best accuracy knowing only the second value),
    by Monte Carlo over the task's distribution."""
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    cls = np.minimum(((a + b) / 2 * classes).astype(np.int64), classes - 1)
    majority = np.bincount(cls, minlength=classes).max() / n
    cell = np.minimum((b * bins).astype(np.int64), bins - 1)
    table = np.zeros((bins, classes))
    np.add.at(table, (cell, cls), 1)
    return float(majority), float(table.max(axis=1).sum() / n)


def accuracy_and_loss(module, params, task):
    y, _ = module.forward(params, task.x.astype(next(iter(params.values())).dtype))
    last = y[-1].astype(np.float64)
    truth = task.targets[-1]
    acc = float(np.mean(np.argmax(last, axis=1) == truth))
    loss = float(-np.mean(np.log(np.maximum(last[np.arange(len(truth)), truth], 1e-30))))
    return acc, loss


def run(name, algorithm, T, args, train, test, k1=None, k2=None):
    module = importlib.import_module(f"bpttgen.generated.{name}")
    trainer = module.Trainer({"I": 2, "H": args.hidden, "O": args.classes}, optimizer="adam",
                             lr=args.lr, clip=args.clip, algorithm=algorithm, k1=k1, k2=k2,
                             seed=args.seed)
    # Compile or load the kernels outside the timed region.
    trainer.module.loss_and_grads(trainer.params, train.x[:4, :2], train.targets[:4, :2],
                                  mask=train.mask[:4, :2] + 1)
    trainer.module.forward(trainer.params, train.x[:4, :2])
    start = time.perf_counter()
    trainer.fit(train.x, train.targets, epochs=args.epochs, batch_size=args.batch_size,
                mask=train.mask, progress=False)
    seconds = time.perf_counter() - start
    acc, loss = accuracy_and_loss(module, trainer.params, test)
    return dict(T=T, model=LABEL[name], bptt="full" if algorithm == "bptt"
                else f"truncated({k1},{k2})", acc=acc, loss=loss, seconds=seconds,
                updates=trainer.steps, diverged=trainer.diverged)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="50,100,200")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--k1", type=int, default=10)
    ap.add_argument("--k2", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run (tests)")
    ap.add_argument("--out", default=RESULTS, help="folder for adding.md ('' for none)")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.train, args.test, args.hidden, args.epochs = "12", 100, 50, 8, 1
        args.k1, args.k2 = 2, 4

    majority, second_only = bounds(args.classes)
    command = "python experiments/adding.py " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    setup = (f"{args.classes} classes, {args.train} training / {args.test} test sequences, "
             f"H = {args.hidden}, {args.epochs} epochs, batch {args.batch_size}, Adam lr "
             f"{args.lr}, clip {args.clip}, truncated BPTT k1 = {args.k1}, k2 = {args.k2}, "
             f"float32, seed {args.seed}, {args.threads} threads")
    print(f"# {command}\n# {setup}\n# bounds: most frequent class {majority:.3f}, second value "
          f"only {second_only:.3f}\n# bpttgen {source_version()}, load average at start: "
          f"{load_average()}", flush=True)
    threshold = second_only + (1 - second_only) / 2
    rows = []
    for T in (int(t) for t in args.lengths.split(",")):
        data = tasks.adding(T, args.train + args.test, classes=args.classes, seed=args.seed)
        train, test = data.split(args.test)
        for name in args.models.split(","):
            for algorithm in ("bptt", "tbptt"):
                k = (args.k1, args.k2) if algorithm == "tbptt" else (None, None)
                r = run(name, algorithm, T, args, train, test, *k)
                r["learned"] = r["acc"] > threshold
                rows.append(r)
                print(f"T={T:<4} {r['model']:<12} {r['bptt']:<17} test acc {r['acc']:.3f}  "
                      f"loss {r['loss']:.3f}  {r['seconds']:6.1f} s  {r['updates']} updates"
                      f"  {'LEARNED' if r['learned'] else '-'}"
                      f"{'  DIVERGED' if r['diverged'] else ''}", flush=True)
    load_end = load_average()
    table = format_table(rows, majority, second_only, threshold, args.classes)
    print("\n" + table + f"\n\nload average at end: {load_end}")
    if args.out and not args.quick:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "adding.md"), "w") as f:
            f.write(f"- command: `{command}`\n- {setup}\n- bpttgen {source_version()}; load "
                    f"average at end: {load_end}\n\n"
                    + table + "\n")
    return rows


def format_table(rows, majority, second_only, threshold, classes):
    lines = [f"Bounds: most frequent class {majority:.3f}; best knowing only the second value "
             f"{second_only:.3f} (a model that forgets the first value); chance "
             f"{1 / classes:.3f}. Learned = test accuracy > {threshold:.3f}.", "",
             "T | Model | BPTT | test accuracy | test loss (nats) | time | updates | learned",
             "--:|-------|------|--------------:|-----------------:|-----:|--------:|:------:"]
    for r in rows:
        lines.append(f"{r['T']} | {r['model']} | {r['bptt']} | {r['acc']:.3f} | "
                     f"{r['loss']:.3f} | {r['seconds']:.1f} s | {r['updates']} | "
                     f"{'yes' if r['learned'] else 'no'}"
                     + (" (diverged)" if r["diverged"] else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
