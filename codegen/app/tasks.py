"""Training data for ``bpttgen train`` and the demo: synthetic tasks and text.

Each task returns a ``Task``: time-major arrays ready for a generated module's
``Trainer.fit``. The same task serves a model with a class-index loss (softmax
cross-entropy: integer targets) and one with a vector loss (SSE, MSE, sigmoid
BCE: float targets); ``target`` picks the form, usually from the module's
``SPEC["target"]``. A mask says which steps carry a loss, so a model whose loss
is at every step still learns a task that is scored only at the end.

* adding (Hochreiter & Schmidhuber's long-dependency problem): a stream of
  random values, two of them marked, one in each half; at the last step say
  their sum. The information sits up to T steps back.
* copy: remember a few symbols, wait, then repeat them after a delimiter.
* parity: the running parity (XOR) of a bit stream, at every step.
* text: a character-level language model of a text file (next character).
"""

import math
import os
from dataclasses import dataclass, field

import numpy as np

TASKS = ("adding", "copy", "parity")


@dataclass
class Task:
    """x (T, N, I) float32; targets (T, N) int64 classes or (T, N, O) float32;
    mask (T, N) float32 (1 where a step's loss counts) or None for every step."""

    name: str
    x: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    sizes: dict  # {"I": input size, "O": output size}
    baseline: float = None  # loss of the best constant prediction (no memory)
    vocabulary: str = None  # text: the characters, class k is vocabulary[k]
    notes: dict = field(default_factory=dict)

    def split(self, n_test):
        """(train, test): the last n_test sequences held out."""
        if not 0 < n_test < self.x.shape[1]:
            raise ValueError(f"n_test must be in (0, {self.x.shape[1]}), got {n_test}")
        cut = self.x.shape[1] - n_test

        def part(sl):
            return Task(self.name, self.x[:, sl], self.targets[:, sl],
                        None if self.mask is None else self.mask[:, sl], self.sizes,
                        self.baseline, self.vocabulary, self.notes)

        return part(slice(0, cut)), part(slice(cut, None))


def _check_counts(seq_len, n, min_len=2):
    if not (isinstance(seq_len, (int, np.integer)) and seq_len >= min_len):
        raise ValueError(f"seq_len must be an integer >= {min_len}, got {seq_len!r}")
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise ValueError(f"the number of sequences must be a positive integer, got {n!r}")


def _entropy(counts):
    p = np.asarray(counts, np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def adding(seq_len=30, n=1000, *, classes=5, target="index", seed=0):
    """The adding problem. Input channels: (value in [0, 1], marker 0/1).

    With target="index" the sum in [0, 2] is binned into ``classes`` equal
    classes (a softmax model); with "vector" it is the number itself (O = 1).
    Only the last step is scored.
    """
    _check_counts(seq_len, n)
    rng = np.random.default_rng(seed)
    T, rows = seq_len, np.arange(n)
    x = np.zeros((T, n, 2), np.float32)
    x[:, :, 0] = rng.uniform(0, 1, (T, n))
    first = rng.integers(0, T // 2, n)  # one marker in each half
    second = rng.integers(T // 2, T, n)
    x[first, rows, 1] = 1
    x[second, rows, 1] = 1
    total = x[first, rows, 0].astype(np.float64) + x[second, rows, 0]
    mask = np.zeros((T, n), np.float32)
    mask[-1] = 1
    if target == "index":
        _check_classes(classes)
        cls = np.minimum((total / 2 * classes).astype(np.int64), classes - 1)
        targets = np.zeros((T, n), np.int64)
        targets[-1] = cls
        baseline = _entropy(np.bincount(cls, minlength=classes))
        return Task("adding", x, targets, mask, {"I": 2, "O": classes}, baseline)
    _check_target(target)
    targets = np.zeros((T, n, 1), np.float32)
    targets[-1, :, 0] = total
    baseline = float(np.var(total))  # MSE of predicting the mean
    return Task("adding", x, targets, mask, {"I": 2, "O": 1}, baseline)


def copy(seq_len=20, n=1000, *, symbols=4, length=3, target="index", seed=0):
    """The copy task: ``length`` random symbols, blanks, a delimiter, then the
    symbols again. Input: one-hot over symbols + blank + delimiter; output classes:
    symbols + blank. Only the recall steps are scored."""
    _check_counts(seq_len, n)
    if not (isinstance(length, int) and length >= 1 and 2 * length + 1 <= seq_len):
        raise ValueError(f"copy needs 1 <= length and 2 * length + 1 <= seq_len, got "
                         f"length={length!r}, seq_len={seq_len}")
    _check_classes(symbols)
    rng = np.random.default_rng(seed)
    T, blank, delim = seq_len, symbols, symbols + 1
    seq = rng.integers(0, symbols, (length, n))
    inp = np.full((T, n), blank)
    inp[:length] = seq
    inp[T - length - 1] = delim
    out = np.full((T, n), blank)
    out[T - length:] = seq
    x = np.eye(symbols + 2, dtype=np.float32)[inp]
    mask = np.zeros((T, n), np.float32)
    mask[T - length:] = 1
    baseline = math.log(symbols)  # guessing a symbol uniformly
    sizes = {"I": symbols + 2, "O": symbols + 1}
    if target == "index":
        return Task("copy", x, out.astype(np.int64), mask, sizes, baseline)
    _check_target(target)
    return Task("copy", x, np.eye(symbols + 1, dtype=np.float32)[out], mask, sizes, None)


def parity(seq_len=20, n=1000, *, target="index", seed=0):
    """Running parity: at step t, the XOR of bits 0..t. Input: one bit (I = 1);
    output: 2 classes, or one 0/1 value (a sigmoid-BCE model). Every step scored."""
    _check_counts(seq_len, n, min_len=1)
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, (seq_len, n))
    par = np.cumsum(bits, axis=0) % 2
    x = bits[:, :, None].astype(np.float32)
    if target == "index":
        return Task("parity", x, par.astype(np.int64), None, {"I": 1, "O": 2}, math.log(2))
    _check_target(target)
    return Task("parity", x, par[:, :, None].astype(np.float32), None, {"I": 1, "O": 1},
                None)


def text(path, seq_len=50, *, max_chars=None, target="index", tokens=False):
    """A character-level language model of a UTF-8 text file: at each step, the
    next character. The text is cut into N = (len - 1) // seq_len sequences. x is
    one-hot (T, N, V) float32, or with ``tokens`` the character codes (T, N) int64
    for a model whose input is tokens (an embedding, as embed_lstm)."""
    if target != "index":
        raise ValueError("a character-level language model needs a model with a "
                         "softmax cross-entropy loss (integer targets)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = f.read(max_chars) if max_chars else f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from None
    _check_counts(seq_len, 1, min_len=1)
    n = (len(data) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{path} has {len(data)} characters: too short for one sequence "
                         f"of {seq_len} (pass a smaller --seq-len)")
    vocabulary = "".join(sorted(set(data)))
    index = {c: i for i, c in enumerate(vocabulary)}
    codes = np.array([index[c] for c in data[:n * seq_len + 1]], np.int64)
    inputs = codes[:-1].reshape(n, seq_len).T
    targets = np.ascontiguousarray(codes[1:].reshape(n, seq_len).T)
    V = len(vocabulary)
    x = np.ascontiguousarray(inputs) if tokens else np.eye(V, dtype=np.float32)[inputs]
    baseline = _entropy(np.bincount(targets.ravel(), minlength=V))  # unigram model
    return Task("text", x, targets, None, {"I": V, "O": V}, baseline, vocabulary)


def make(name, seq_len, n, *, target="index", seed=0):
    """A synthetic task by name, with its default options."""
    builders = {"adding": adding, "copy": copy, "parity": parity}
    if name not in builders:
        raise ValueError(f"unknown task {name!r}; choose one of {TASKS}")
    return builders[name](seq_len, n, target=target, seed=seed)


def _check_classes(k):
    if not (isinstance(k, int) and k >= 2):
        raise ValueError(f"the number of classes must be an integer >= 2, got {k!r}")


def _check_target(target):
    if target not in ("index", "vector"):
        raise ValueError(f"target must be 'index' or 'vector', got {target!r}")


class TextStream:
    """A UTF-8 text file as ``streams`` sequences side by side, read in chunks and never
    held whole (``bpttgen train --text FILE --stream``): stream b is the b-th of equal
    parts of the text, and step t asks each for its next character. ``chunks(start)``
    yields (x (t, B, V) one-hot float32, targets (t, B) int64) from step ``start`` on;
    with ``tokens``, x is the codes (t, B) int64 (a model whose input is tokens).

    One pass finds the vocabulary and counts; a second writes the character codes to
    a temporary file (``close()`` removes it), which the chunks read by offset."""

    def __init__(self, path, streams, chunk=4096, *, target="index", block=1 << 20,
                 tokens=False):
        import codecs
        import tempfile

        if target != "index":
            raise ValueError("a character-level language model needs a model with a "
                             "softmax cross-entropy loss (integer targets)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text file {path!r} does not exist")
        for name, n in (("chunk", chunk), ("streams", streams)):
            if not (isinstance(n, (int, np.integer)) and n >= 1):
                raise ValueError(f"{name} must be a positive integer, got {n!r}")

        def blocks():
            decoder = codecs.getincrementaldecoder("utf-8")()
            with open(path, "rb") as f:
                try:
                    while True:
                        raw = f.read(block)
                        text = decoder.decode(raw, final=not raw)
                        if text:
                            yield text
                        if not raw:
                            return
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path} is not UTF-8 text: {err}") from None

        seen = set()
        for text in blocks():
            seen.update(text)
        self.vocabulary = "".join(sorted(seen))
        V = len(self.vocabulary)
        code = {c: i for i, c in enumerate(self.vocabulary)}
        self.dtype = np.uint8 if V <= 256 else np.uint32
        counts = np.zeros(V, np.int64)
        fd, self._codes = tempfile.mkstemp(prefix="bpttgen-text-", suffix=".codes")
        length = 0
        with os.fdopen(fd, "wb") as out:
            for text in blocks():
                codes = np.fromiter((code[c] for c in text), self.dtype, len(text))
                counts += np.bincount(codes, minlength=V)
                out.write(codes.tobytes())
                length += len(text)
        self.streams, self.chunk, self.tokens = streams, chunk, tokens
        self.steps = (length - 1) // streams  # each stream: steps inputs, one more target
        if self.steps < 1:
            self.close()
            raise ValueError(f"{path} has {length} characters: too short for "
                             f"{streams} streams")
        self.name, self.sizes = "text", {"I": V, "O": V}
        self.baseline = _entropy(counts)
        self.x = self.targets = self.mask = None  # a stream has no arrays in memory

    def _read(self, b, start, count):
        itemsize = np.dtype(self.dtype).itemsize
        return np.fromfile(self._codes, self.dtype, count,
                           offset=(b * self.steps + start) * itemsize).astype(np.int64)

    def chunks(self, start=0):
        V = len(self.vocabulary)
        for a in range(start, self.steps, self.chunk):
            t = min(self.chunk, self.steps - a)
            codes = np.stack([self._read(b, a, t + 1) for b in range(self.streams)], axis=1)
            if self.tokens:
                yield np.ascontiguousarray(codes[:-1]), codes[1:]
                continue
            x = np.zeros((t, self.streams, V), np.float32)
            np.put_along_axis(x, codes[:-1, :, None], 1.0, axis=2)
            yield x, codes[1:]

    def close(self):
        if os.path.exists(self._codes):
            os.remove(self._codes)
