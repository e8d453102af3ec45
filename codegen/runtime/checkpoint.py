"""Checkpointed BPTT: the exact gradient of a long sequence in bounded memory.

The sequence is cut into n segments of L steps (the last may be shorter). Only the
states at some segment boundaries are kept (snapshots); a segment's trajectory is
recomputed from the nearest snapshot before it, just before its backward sweep, in
a workspace of L steps that every segment reuses. The adjoint of the states at a
segment's start is what the sweep of the segment before it starts from, so the
gradient is the one full-storage BPTT computes, summed in another order.

Which boundaries to keep is the binomial schedule of Griewank and Walther (revolve,
ACM TOMS 26(1), 2000): with s snapshots besides the start's, reversing n segments
takes at least  r n - C(s+1+r, s+2)  segment forwards beyond the one each segment's
own sweep needs, r the least integer with C(s+1+r, s+1) >= n; the schedule below
attains it (tests/test_checkpoint.py checks it against an exhaustive search). With
a snapshot at every boundary (s = n - 1) that is one extra forward of the sequence:
the sqrt(T) schedule when L = sqrt(T).

Memory of a call (``memory``): the snapshots, the L-step workspace, the buffers of
one segment's input, targets and predictions; never O(T).
"""

import math

import numpy as np

from .calls import (BACKWARD, FORWARD_AND_LOSS, GRADIENTS, STATES, bytes_text,
                    check_memory_limit, input_columns, input_rows, input_width_text)

#: Python's cost of one segment's kernel calls, in steps of the recurrence: the
#: planner's penalty for segments so short that calls, not steps, dominate.
CALL_COST_STEPS = 4


def repetitions(n, s):
    """The least r with C(s+1+r, s+1) >= n: how often the step run most often is run
    when n segments are reversed with s snapshots besides the start's."""
    r = 0
    while _reversible(s, r) < n:
        r += 1
    return r


def advances(n, s):
    """The least number of segment forwards (without storing their trajectory) that
    reversing n segments takes with s snapshots besides the start's."""
    if n <= 1:
        return 0
    r = repetitions(n, s)
    return r * n - math.comb(s + 1 + r, s + 2)


def _reversible(s, r):
    """The most segments s snapshots besides the start's reverse with no segment run
    more than r times beyond its own sweep: C(s+1+r, r)."""
    return math.comb(s + 1 + r, r) if r >= 0 else 0


def _split(n, s):
    """Where the first snapshot of n segments goes (s >= 1): the least m that leaves
    both parts optimal, the right one (s - 1 snapshots) within r repetitions and the
    left one, run once more, within r - 1 and using them all."""
    r = repetitions(n, s)
    return max(1, n - _reversible(s - 1, r), _reversible(s, r - 2))


def schedule(n, s):
    """The actions reversing segments 0 .. n-1 with at most s snapshots besides the
    start's (held as snapshot 0), in order:

    ("advance", a, m)  run segments a .. m-1 from snapshot a, keeping only the state
    ("store", m)       keep that state as snapshot m
    ("reverse", i)     recompute segment i from snapshot i (or from the state just
                       advanced to it) and sweep it backward
    ("free", i)        drop snapshot i

    >>> list(schedule(3, 0))
    [('advance', 0, 2), ('reverse', 2), ('advance', 0, 1), ('reverse', 1), ('reverse', 0), \
('free', 0)]
    """
    stack = [(0, n, s)]
    while stack:
        a, b, s = stack.pop()
        if b - a > 1 and s > 0:
            m = a + _split(b - a, s)
            yield ("advance", a, m)
            yield ("store", m)
            stack.append((a, m, s))
            stack.append((m, b, s - 1))
            continue
        for i in range(b - 1, a, -1):  # no snapshot left: from a, once per segment
            yield ("advance", a, i)
            yield ("reverse", i)
        yield ("reverse", a)
        yield ("free", a)


class Plan:
    """A checkpointed call's shape: segments of ``segment`` steps, ``snapshots`` kept
    besides the start's, the extra segment forwards it runs and its bytes."""

    def __init__(self, T, segment, snapshots, step_bytes, state_bytes, fixed_bytes):
        self.T, self.segment = T, segment
        self.segments = -(-T // segment)
        self.snapshots = min(snapshots, self.segments - 1)
        self.advances = advances(self.segments, self.snapshots)
        # snapshots + the start's, the adjoint entering a segment and leaving it
        self.bytes = (fixed_bytes + segment * step_bytes
                      + (self.snapshots + 3) * state_bytes)

    @property
    def cost(self):
        """Predicted time in steps beyond full-storage BPTT's: the recomputation, and
        the calls."""
        return (self.advances * self.segment
                + CALL_COST_STEPS * (self.segments + self.advances))

    def __repr__(self):
        return (f"{self.segments} segments of {self.segment} steps, {self.snapshots} "
                f"snapshots, {self.advances} segment recomputations, about "
                f"{bytes_text(self.bytes)}")


def plan(T, step_bytes, state_bytes, fixed_bytes, *, memory_limit=None, snapshots=None,
         segment=None):
    """The Plan of a checkpointed call. Given: segment (steps) and/or snapshots (a count);
    else the cheapest plan within memory_limit bytes; else sqrt(T) segments with a
    snapshot at every boundary (one extra forward). Refuses a memory_limit no plan
    fits, naming the least memory any plan takes."""
    def make(L, s):
        return Plan(T, L, s, step_bytes, state_bytes, fixed_bytes)

    if segment is not None or snapshots is not None:
        # a segment longer than the sequence is the sequence
        L = min(T, segment) if segment is not None else max(1, math.isqrt(T - 1) + 1)
        n = -(-T // L)
        chosen = make(L, n - 1 if snapshots is None else snapshots)
    elif memory_limit is None:
        L = max(1, math.isqrt(T - 1) + 1)
        chosen = make(L, -(-T // L) - 1)
    else:
        candidates = []
        L = 1
        while True:
            room = memory_limit - make(L, 0).bytes
            if room >= 0:
                candidates.append(make(L, int(room // state_bytes)))
            if L >= T:
                break
            L = min(T, max(L + 1, int(L * 1.2)))
        if not candidates:
            least = min((make(L, 0) for L in (1, T)), key=lambda p: p.bytes)
            raise ValueError(f"no checkpointed schedule fits memory_limit="
                             f"{bytes_text(int(memory_limit))}: the least takes "
                             f"{bytes_text(least.bytes)} ({least!r}); raise the limit or "
                             "use a smaller batch")
        chosen = min(candidates, key=lambda p: (p.cost, p.bytes))
    if memory_limit is not None and chosen.bytes > memory_limit:
        raise ValueError(f"checkpointed BPTT with {chosen!r} exceeds memory_limit="
                         f"{bytes_text(int(memory_limit))}")
    return chosen


def check_sequence(spec, x, targets, mask):
    """T, after the checks a checkpointed call makes before reading any segment: each
    of x, targets, mask an array or read by slices, x (T, B, size), targets and mask
    starting with x's (T, B). Their values are checked segment by segment."""
    for name, a in (("x", x), ("targets", targets), ("mask", mask)):
        if a is not None and not (hasattr(a, "shape") and hasattr(a, "__getitem__")):
            raise TypeError(f"{name} must be an array (or read by slices, as np.memmap), "
                            f"got {type(a).__name__}")
    if spec.get("tokens") and len(x.shape) != 2:
        raise ValueError(f"x must have shape (T, B) of integer tokens (time-major), got "
                         f"{x.shape}")
    if not spec.get("tokens") and len(x.shape) != 3:
        raise ValueError(f"x must have shape (T, B, {input_width_text(spec)}) (time-major), got "
                         f"{x.shape}")
    for name, a in (("targets", targets), ("mask", mask)):
        if a is not None and tuple(a.shape[:2]) != tuple(x.shape[:2]):
            raise ValueError(f"{name} must start with x's (T, B) = {tuple(x.shape[:2])}, "
                             f"got shape {tuple(a.shape)}")
    return x.shape[0]


def check_options(memory_limit, snapshots, segment):
    for name, v, least in (("snapshots", snapshots, 0), ("segment", segment, 1)):
        if v is not None and not (isinstance(v, (int, np.integer)) and v >= least):
            raise ValueError(f"{name} must be an integer >= {least}, got {v!r}")
    check_memory_limit(memory_limit)


# -- the run --------------------------------------------------------------------

def segment_view(model, ws, full, steps):
    """The workspace of a segment of ``steps`` < ``full`` steps: each time-indexed
    array's first rows (contiguous views), the sizes T and TB set to match."""
    B = ws["B"]
    dims = [ws[s] for s in model.spec["sizes"]]
    short, long = model.shapes(steps, B, *dims), model.shapes(full, B, *dims)
    view = dict(ws, T=steps, TB=steps * B)
    for name, shape in short.items():
        if shape != long[name]:
            view[name] = ws[name][:shape[0]]
    view.update((name, ws[name][:steps * B]) for name in model.inputs)
    return view


def run(model, params, x, targets, mask, state0, sizes, T, B, dtype, chosen, check):
    """(loss, gradients) of full BPTT over the sequence, computed along ``chosen``'s
    schedule; x, targets, mask are read one segment at a time (x[a:b]) and each read
    passes check(x, targets, mask) first."""
    L = chosen.segment
    # tokens stay integers: the buffer is what the kernels read (calls.input_rows)
    xbuf = (np.empty((L, B), np.int64) if model.spec.get("tokens") else
            np.empty((L, B, x.shape[2]), dtype))
    ws = model.workspace(sizes, L, B, dtype, params, xbuf, state0)
    views = {L: ws}
    O = sizes[model.spec["output"][1]]
    y = np.empty((L * B, O), dtype)
    weights, total = segment_weights(model.spec, T, B, mask, dtype)
    zeros, ones = model.cache.zeros, model.cache.ones

    def load(i, state):
        """The workspace of segment i with its input and its entering state."""
        lo, hi = i * L, min(T, (i + 1) * L)
        seg = views.get(hi - lo)
        if seg is None:
            seg = views[hi - lo] = segment_view(model, ws, L, hi - lo)
        chunk, ts = np.asarray(x[lo:hi]), np.asarray(targets[lo:hi])
        check(chunk, ts, None if mask is None else np.asarray(mask[lo:hi]))
        xbuf[:hi - lo] = chunk
        if len(model.inputs) > 1:  # the inputs' arrays are copies of xbuf's columns
            columns = input_columns(model.spec, sizes, input_rows(model.spec, chunk))
            for name, rows in zip(model.inputs, columns):
                ws[name][:len(rows)] = rows
        for s, array in model.states.items():
            seg[array][:B] = state[s]
        return seg, lo, hi, ts

    def advance(a, m, state):
        for i in range(a, m):
            seg, lo, hi, _ = load(i, state)
            model.run(STATES, model._tuple(seg))
            state = {s: seg[array][(hi - lo) * B:].copy() for s, array in model.states.items()}
        return state

    def sweep(i, state, delta):
        """Recompute segment i and sweep it backward; its loss, its gradients' terms
        and the adjoint of the state entering it."""
        seg, lo, hi, ts = load(i, state)
        for name in zeros:
            seg[name].fill(0)
        for name in ones:
            seg[name].fill(1)
        args = model._tuple(seg)
        steps = hi - lo
        loss = model.run(FORWARD_AND_LOSS, args, targets=model._targets(sizes, steps, B, ts),
                         weights=weights(lo, hi), scale=1.0 / total, y=y[:steps * B])
        for s, array in model.adjoints.items():
            if array is not None and delta is not None:
                seg[array][steps * B:] += delta[s]
        model.run(BACKWARD | GRADIENTS, args, steps - 1, 0)
        delta = {s: (seg[a][:B].copy() if a is not None else None)
                 for s, a in model.adjoints.items()}
        return loss, model._gradients(seg), delta

    def add(grads, g):
        # the views are overwritten by the next segment: sum into copies
        return ({p: np.array(v) for p, v in g.items()} if grads is None
                else {p: grads[p] + g[p] for p in grads})

    start = {s: (np.zeros((B, sizes[size]), dtype) if state0 is None
                 else np.asarray(state0[s], dtype))
             for s, size in model.spec["states"].items()}
    loss, grads = walk(chosen, start, advance, sweep, add)
    return loss / total, grads


def walk(chosen, start, advance, sweep, add):
    """Run ``chosen``'s schedule; what a device does is the executor's (run here, the
    CUDA Model's on the GPU), states and adjoints in its own arrays:

    advance(a, m, state)    the state entering segment m, run from ``state`` entering a
    sweep(i, state, delta)  (loss, gradient terms, adjoint of the state entering i) of
                            segment i recomputed from ``state`` and swept backward from
                            ``delta``, the adjoint entering from segment i + 1 (None
                            for the last segment)
    add(total, terms)       the sum of the terms so far (None before the first) and these

    Returns (the summed losses, the summed gradient terms)."""
    snapshots, current, delta = {0: start}, None, None
    loss, grads = 0.0, None
    for action, *where in schedule(chosen.segments, chosen.snapshots):
        if action == "advance":
            current = (where[1], advance(where[0], where[1], snapshots[where[0]]))
        elif action == "store":
            snapshots[where[0]] = current[1]
        elif action == "free":
            snapshots.pop(where[0], None)
        else:
            i = where[0]
            state = snapshots[i] if i in snapshots else current[1]
            part, g, delta = sweep(i, state, delta)
            loss += part
            grads = add(grads, g)
    return loss, grads


def segment_weights(spec, T, B, mask, dtype):
    """(weights(lo, hi): the loss weights of steps lo..hi-1 flat, total): as
    calls.loss_weights for the whole sequence, built one segment at a time."""
    last = spec["loss_at"] == "last"
    if mask is None:
        total = float(B if last else T * B)
    else:  # read by slices, as the sweep reads it
        block = 1 << 16
        total = sum(float(np.sum(np.asarray(mask[lo:min(T, lo + block)]), dtype=np.float64))
                    for lo in range(T - 1 if last else 0, T, block))
    if total <= 0:
        raise ValueError("mask selects no loss term (its sum is 0)")

    def weights(lo, hi):
        w = np.ones((hi - lo, B), dtype) if mask is None else \
            np.asarray(mask[lo:hi]).astype(dtype)
        if last:
            w[:-1] = 0
            if hi < T:
                w[-1] = 0
        return np.ascontiguousarray(w.reshape(-1))

    return weights, total
