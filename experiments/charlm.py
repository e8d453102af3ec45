"""Seed 000's table, completed: a character-level language model trained with
bpttgen's generated modules and each BPTT algorithm.

Runs, on one text file (e.g. shared/data/tinyshakespeare.txt):

    Elman  naive BPTT (O(T^2), seed 000's "old")      | on the first --naive-chars
    Elman  accumulated BPTT (O(T))                    | only: the same gradients, so
                                                      | the same perplexity; time ratio
    Elman  accumulated BPTT                           | on all --train-chars:
    Elman  truncated BPTT(k1, k2) for a few (k1, k2)  | (online updates every k1 steps)
    LSTM   accumulated BPTT                           |
    GRU    accumulated BPTT                           |
    LSTM over a learned embedding (embed_lstm)        | (--runs ...,embed: the
                                                      | characters as tokens)

and reports validation perplexity, bits per character and wall time as the table
"Model | BPTT | PPL | time". Split: the first 90% of the file is training text,
the last 10% validation (the conventional split of tinyshakespeare); a slice of
each is used (--train-chars, --val-chars) so the whole table takes minutes on
2 cores. Training: sequences of --seq-len characters from a zero state, shuffled
minibatches, Adam, gradient clipping. Validation: the validation slice as
--val-streams contiguous streams, the state carried from start to end, every
character predicted.

    python experiments/charlm.py ../shared/data/tinyshakespeare.txt [--quick]
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

TBPTT = ((8, 16), (16, 32), (32, 64))


def load(path, train_chars, val_chars):
    """(vocabulary, train codes, validation codes): 90/10 split of the file, then
    the first train_chars / val_chars of each part."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if len(text) < 100:
        raise ValueError(f"{path} has {len(text)} characters: too short for a language model")
    vocabulary = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocabulary)}
    codes = np.fromiter((index[c] for c in text), np.int64, len(text))
    cut = int(0.9 * len(codes))
    return vocabulary, codes[:cut][:train_chars], codes[cut:][:val_chars]


def sequences(codes, seq_len, V):
    """One-hot inputs (T, N, V) float32, the same as tokens (T, N) int64 (for a model
    of token inputs) and next-character targets (T, N)."""
    n = (len(codes) - 1) // seq_len
    inputs = np.ascontiguousarray(codes[:n * seq_len].reshape(n, seq_len).T)
    targets = np.ascontiguousarray(codes[1:n * seq_len + 1].reshape(n, seq_len).T)
    return np.eye(V, dtype=np.float32)[inputs], inputs, targets


def evaluate(module, params, codes, V, streams, chunk=256):
    """Mean cross-entropy (nats per character) over the codes as `streams`
    contiguous streams, the state carried through each stream."""
    L = (len(codes) - 1) // streams
    inputs = codes[:streams * L].reshape(streams, L).T
    targets = codes[1:streams * L + 1].reshape(streams, L).T
    eye = np.eye(V, dtype=next(iter(params.values())).dtype)
    tokens = module.SPEC.get("tokens")
    state, total = None, 0.0
    for lo in range(0, L, chunk):
        x = np.ascontiguousarray(inputs[lo:lo + chunk] if tokens else eye[inputs[lo:lo + chunk]])
        y, state = module.forward(params, x, state0=state)
        p = np.take_along_axis(y, targets[lo:lo + chunk, :, None], axis=2)
        total -= float(np.sum(np.log(np.maximum(p.astype(np.float64), 1e-30))))
    return total / (streams * L)


def unigram_nats(train, val, V):
    counts = np.bincount(train, minlength=V).astype(np.float64) + 1.0  # add-one
    p = counts / counts.sum()
    return float(-np.mean(np.log(p[val[1:]])))


def run(name, algorithm, args, data, k1=None, k2=None, n=None, dtype=None):
    """Train one model (on the first n sequences if n); returns a result row (dict)."""
    vocabulary, x, tokens, targets, val = data
    module = importlib.import_module(f"bpttgen.generated.{name}")
    dtype = dtype or (np.float64 if args.float64 else np.float32)
    V = len(vocabulary)
    if module.SPEC["tokens"]:  # the characters' codes, looked up in its embedding
        x, sizes = tokens, {"V": V, "D": args.embed, "H": args.hidden}
    else:
        x, sizes = x.astype(dtype, copy=False), {"I": V, "H": args.hidden, "O": V}
    if n is not None:
        x, targets = x[:, :n], targets[:, :n]
    trainer = module.Trainer(sizes, optimizer="adam", lr=args.lr,
                             clip=args.clip, algorithm=algorithm, k1=k1, k2=k2,
                             seed=args.seed, dtype=dtype)
    # Compile or load the kernels outside the timed region.
    module.loss_and_grads(trainer.params, x[:4, :2], targets[:4, :2],
                          algorithm=algorithm, k1=min(k1 or 1, 4) if k1 else None,
                          k2=min(k2 or 1, 4) if k2 else None)
    module.forward(trainer.params, x[:4, :2])
    start = time.perf_counter()
    history = trainer.fit(x, targets, epochs=args.epochs, batch_size=args.batch_size,
                          progress=False)
    seconds = time.perf_counter() - start
    nats = evaluate(module, trainer.params, val, V, args.val_streams)
    label = {"bptt": "accumulated", "naive": "naive (old)"}.get(
        algorithm, f"truncated({k1},{k2})")
    row = dict(model={"elman": "RNN (Elman)", "lstm": "LSTM", "gru": "GRU",
                      "embed_lstm": f"LSTM, embedding D = {args.embed}"}[name]
               + ("" if n is None else f", {n * args.seq_len // 1024}k chars, "
                  f"{np.dtype(dtype).name}"),
               bptt=label, ppl=math.exp(nats), bpc=nats / math.log(2), seconds=seconds,
               train_loss=history["loss"][-1] if history["loss"] else float("nan"),
               updates=trainer.steps, diverged=trainer.diverged)
    print(f"{row['model']:<12} {row['bptt']:<17} PPL {row['ppl']:8.4f}  bpc {row['bpc']:.4f}"
          f"  {seconds:7.1f} s  ({row['updates']} updates, last train loss "
          f"{row['train_loss']:.4f}){'  DIVERGED' if row['diverged'] else ''}", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text", help="a UTF-8 text file, e.g. shared/data/tinyshakespeare.txt")
    ap.add_argument("--train-chars", type=int, default=524288)
    ap.add_argument("--naive-chars", type=int, default=131072,
                    help="the naive vs accumulated pair trains on this many characters")
    ap.add_argument("--val-chars", type=int, default=65536)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--embed", type=int, default=32,
                    help="embedding size D of the embed run (embed_lstm)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--clip", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-streams", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--float64", action="store_true")
    ap.add_argument("--pair-float32", action="store_true",
                    help="train the naive/accumulated pair in float32 (default float64: in "
                    "float32 Adam amplifies the rounding differences of the two sums)")
    ap.add_argument("--runs", default="naive,bptt,tbptt,lstm,gru",
                    help="which rows: naive, bptt, tbptt, lstm, gru, embed (an LSTM over "
                    "token inputs and a learned embedding: no one-hot product)")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run (tests)")
    ap.add_argument("--out", default=RESULTS, help="folder for charlm.md ('' for none)")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_chars, args.val_chars, args.seq_len = 4096, 1024, 16
        args.naive_chars = 2048
        args.hidden, args.epochs, args.batch_size, args.val_streams = 16, 1, 16, 4
        args.embed = 8

    vocabulary, train, val = load(args.text, args.train_chars, args.val_chars)
    V = len(vocabulary)
    x, tokens, targets = sequences(train, args.seq_len, V)
    data = (vocabulary, x, tokens, targets, val)
    command = "python experiments/charlm.py " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    setup = (f"{os.path.basename(args.text)}: {len(train)} training characters (first 90% of "
             f"the file, its start), {len(val)} validation characters (last 10%), vocabulary "
             f"{V}; sequences of {args.seq_len}, H = {args.hidden}, {args.epochs} epochs, "
             f"batch {args.batch_size}, Adam lr {args.lr}, clip {args.clip}, "
             f"{'float64' if args.float64 else 'float32'}, seed {args.seed}, "
             f"{args.threads} threads; the naive/accumulated pair on the first "
             f"{min(args.naive_chars, len(train))} training characters")
    print(f"# {command}\n# {setup}\n# bpttgen {source_version()}, load average at start: "
          f"{load_average()}", flush=True)
    base = unigram_nats(train, val, V)
    print(f"unigram (no context) validation PPL {math.exp(base):.2f}, "
          f"bpc {base / math.log(2):.3f}", flush=True)

    runs = args.runs.split(",")
    rows = []
    if "naive" in runs:
        n = min(x.shape[1], max(1, args.naive_chars // args.seq_len))
        pair = np.float32 if args.pair_float32 else np.float64
        rows.append(run("elman", "naive", args, data, n=n, dtype=pair))
        rows.append(run("elman", "bptt", args, data, n=n, dtype=pair))
    if "bptt" in runs:
        rows.append(run("elman", "bptt", args, data))
    if "tbptt" in runs:
        for k1, k2 in TBPTT:
            if k2 <= args.seq_len:
                rows.append(run("elman", "tbptt", args, data, k1, k2))
    for name in ("lstm", "gru"):
        if name in runs:
            rows.append(run(name, "bptt", args, data))
    if "embed" in runs:
        rows.append(run("embed_lstm", "bptt", args, data))
    load_end = load_average()
    table = format_table(rows, base, args.seq_len)
    print("\n" + table + f"\n\nload average at end: {load_end}")
    if args.out and not args.quick:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "charlm.md"), "w") as f:
            f.write(f"- command: `{command}`\n- {setup}\n- bpttgen {source_version()}; load "
                    f"average at end: {load_end}\n\n"
                    + table + "\n")
    return rows


def format_table(rows, unigram, T):
    lines = ["Model | BPTT | PPL | bits/char | time | updates",
             "------|------|----:|----------:|-----:|-------:",
             "RNN (seed 000, word-level, another corpus) | old | 252 | | |",
             f"unigram (no context) | - | {math.exp(unigram):.2f} | "
             f"{unigram / math.log(2):.3f} | | |"]
    for r in rows:
        lines.append(f"{r['model']} | {r['bptt']} | {r['ppl']:.3f} | {r['bpc']:.4f} | "
                     f"{r['seconds']:.1f} s | {r['updates']}"
                     + (" (diverged)" if r["diverged"] else ""))
    pair = [r for r in rows if r["model"].startswith("RNN") and "chars" in r["model"]]
    if len(pair) == 2:
        a, b = pair
        lines += ["", f"naive / accumulated wall time: {a['seconds'] / b['seconds']:.1f}x "
                  f"(T = {T}; seed 000 predicts ~T/c); perplexities {a['ppl']:.4f} vs "
                  f"{b['ppl']:.4f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
