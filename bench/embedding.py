#!/usr/bin/env python
"""A character (or word) LM's epoch time: one-hot inputs (lstm, x (T, N, V) through a
full (4H x V) product) against token inputs looked up in an embedding (embed_lstm,
x (T, N) integers, a (D, V) table gathered per step and scatter-added in the backward).

    python bench/embedding.py [--vocab 65,10000] [--hidden 128] [--embed 64] [--repeats 3]

Time it with the machine quiet (DESIGN.md's performance notes: a second busy process
halves the 2-thread libraries), and record the CPU flags with the figures. Random
tokens (the time of an epoch does not depend on the text); the same T, N, batch, H,
Adam and float32 for both; the kernels are compiled (or loaded) before the timed
epochs, the median of --repeats epochs is reported. The two models differ in their
input layer only: lstm multiplies the one-hot x by W_x (4H x V) in one hoisted
product; embed_lstm gathers columns of E (D x V), then multiplies by W (4H x D).
At V = 10000 the one-hot x alone is T*N*V*4 bytes (164 MB at the defaults).
"""

import argparse
import importlib
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def epoch_seconds(name, V, args):
    module = importlib.import_module(f"bpttgen.generated.{name}")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, (args.seq_len, args.sequences))
    targets = rng.integers(0, V, (args.seq_len, args.sequences))
    if module.SPEC["tokens"]:
        x, sizes = tokens, {"V": V, "D": args.embed, "H": args.hidden}
    else:
        x = np.zeros((args.seq_len, args.sequences, V), np.float32)
        np.put_along_axis(x, tokens[:, :, None], 1.0, axis=2)
        sizes = {"I": V, "H": args.hidden, "O": V}
    trainer = module.Trainer(sizes, optimizer="adam", lr=1e-3, dtype=np.float32, seed=0)
    trainer.fit(x[:, :args.batch_size], targets[:, :args.batch_size], epochs=1,
                batch_size=args.batch_size, progress=False)  # compile, allocate
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        trainer.fit(x, targets, epochs=1, batch_size=args.batch_size, progress=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", default="65,10000", help="vocabulary sizes, comma-separated")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--sequences", type=int, default=64, help="N sequences an epoch")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--embed", type=int, default=64, help="embedding size D")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
        flags = " ".join(sorted(fl for fl in line.split() if fl.startswith(("avx", "fma"))))
    print(f"# python bench/embedding.py {' '.join(argv if argv is not None else sys.argv[1:])}"
          f"\n# T={args.seq_len} N={args.sequences} batch={args.batch_size} H={args.hidden} "
          f"D={args.embed}, float32, Adam; CPU flags: {flags or 'unknown'}")
    print("V | one-hot lstm (s/epoch) | embed_lstm (s/epoch) | ratio")
    print("--:|--:|--:|--:")
    rows = []
    for V in (int(v) for v in args.vocab.split(",")):
        one_hot = epoch_seconds("lstm", V, args)
        embed = epoch_seconds("embed_lstm", V, args)
        rows.append((V, one_hot, embed))
        print(f"{V} | {one_hot:.3f} | {embed:.3f} | {one_hot / embed:.1f}x", flush=True)
    return rows


if __name__ == "__main__":
    main()
