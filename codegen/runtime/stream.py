"""Training on a stream: the online algorithms fed a sequence chunk by chunk.

A Trainer's truncated BPTT, RTRL and ARTBP never need the whole sequence: TBPTT(k1,
k2) looks back k2 steps (seed 003), RTRL carries the states and their sensitivities
(seed 001), ARTBP backpropagates the stretch since its last random cut. Each
algorithm is an engine fed chunks of any lengths, holding what it must between them:
TBPTT the last k1 + k2 steps of input and the states where a window may start, RTRL
fewer than ``every`` steps, ARTBP its stretch; never O(T). ``Trainer.step`` feeds
one whole minibatch to the same engines, so a stream and a sequence in memory take
the same updates, and an engine's state is saved with the Trainer: a stream resumes
where it stopped.
"""

import numpy as np

# The ARTBP draws of a Trainer come from (seed, this stream, update count): a
# resumed run draws what the uninterrupted one would have.
_ARTBP_STREAM = 0xA27B


def _cat(a, b):
    return b if a is None else np.concatenate([a, b])


class _Engine:
    """What every engine does alike: hold the steps received and not yet used up
    (x, targets, mask, in step order), apply an update and keep its loss."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.x = self.targets = self.mask = None
        self.pos = 0  # steps received
        self.losses, self.weights = [], []

    @property
    def held_steps(self):
        return 0 if self.x is None else len(self.x)

    def _hold(self, x, targets, mask):
        T, B = x.shape[:2]
        self.x, self.targets = _cat(self.x, x), _cat(self.targets, targets)
        self.mask = _cat(self.mask, np.ones((T, B), self.trainer.dtype) if mask is None else mask)
        self.pos += T

    def _update(self, loss, grads, w):
        """Apply the update of a stretch with loss weights w; False if training diverged."""
        if not self.trainer._guarded_apply(loss, grads):
            return False
        self.losses.append(loss)
        self.weights.append(float(w.sum()))
        return True

    def mean_loss(self):
        return float(np.dot(self.losses, self.weights) / sum(self.weights)) \
            if self.weights else 0.0


def run_one(engine, x, targets, mask, **options):
    """Feed an engine one whole minibatch and close it (Trainer.step): its mean loss."""
    if engine.feed(x, targets, mask, **options):
        engine.close()
    return engine.mean_loss()


class Tbptt(_Engine):
    """TBPTT(k1, k2) over a stream: each time k1 more steps have arrived, the losses of
    those k1 steps backpropagated over the last k2 steps, and an update. The state
    crosses to the next window as the forward pass computes it under the weights then
    in force. The last window, at the end of the stream, takes the steps left."""

    def __init__(self, trainer, state0=None):
        super().__init__(trainer)  # holds steps lo .. pos-1
        self.k1, self.k2 = trainer.k1, trainer.k2
        self.lo = self.first = 0  # the first step held, the next loss step
        self.states = {0: state0}  # position -> the state entering it (None: zeros)

    def feed(self, x, targets, mask):
        """Take a chunk; run the windows it completes. False when training diverged."""
        self._hold(x, targets, mask)
        while self.first + self.k1 <= self.pos:
            if not self._window(self.first + self.k1 - 1, last=False):
                return False
        return True

    def close(self):
        """The end of the stream: the window of the steps left, if any."""
        if self.first < self.pos:
            return self._window(self.pos - 1, last=True)
        return True

    def _rows(self, a, b):
        return slice(a - self.lo, b - self.lo)

    def _state_at(self, p):
        """The state entering step p: kept, or run forward from the last kept before it
        (only a last window's start, under the weights now in force)."""
        if p in self.states:
            return self.states[p]
        q = max(s for s in self.states if s < p)
        _, state = self.trainer.module.forward(self.trainer.params, self.x[self._rows(q, p)],
                                               state0=self.states[q])
        return state

    def _window(self, end, last):
        t, k1, k2, first = self.trainer, self.k1, self.k2, self.first
        start = max(0, end - k2 + 1)
        rows = self._rows(start, end + 1)
        # the loss weights' dtype is the parameters' (x may be integer tokens)
        w = np.zeros((end - start + 1, self.x.shape[1]), t.dtype)
        w[first - start:] = self.mask[self._rows(first, end + 1)]
        if w.sum() > 0:  # a window without loss terms (a masked stretch): no update
            loss, grads = t.loss_and_grads(self.x[rows], self.targets[rows],
                                           state0=self._state_at(start), mask=w)
            if not self._update(loss, grads, w):
                return False
        self.first = end + 1
        if last:
            return True
        # Carry the state over the window's loss steps under the weights now in force,
        # keeping it where a later full window starts: one forward call per stretch.
        starts = {max(0, e - k2 + 1) for e in range(end + k1, end + k1 + k2 + 1, k1)}
        stops = sorted({end + 1} | {s for s in starts if first < s <= end})
        at = first
        for stop in stops:
            _, self.states[stop] = t.module.forward(t.params, self.x[self._rows(at, stop)],
                                                    state0=self.states[at])
            at = stop
        # Keep what a later window can read: from the last kept state at or before the
        # earliest step a window can still start at (a last one, ending at end + 1).
        keep = max(s for s in self.states if s <= max(0, end + 2 - k2))
        self.states = {s: v for s, v in self.states.items() if s >= keep}
        drop = keep - self.lo
        if drop > 0:
            self.x, self.targets, self.mask = (a[drop:] for a in
                                               (self.x, self.targets, self.mask))
            self.lo = keep
        return True


class Rtrl(_Engine):
    """RTRL over a stream: every ``every`` steps, the gradient of those steps' losses
    through the sensitivities carried from the stream's start, and an update. Later
    steps run with the new weights while the sensitivities carry on (they hold
    derivatives taken under earlier weights, RTRL's usual approximation)."""

    def __init__(self, trainer, state0=None):
        super().__init__(trainer)  # holds fewer than every steps, not yet run
        self.every = trainer.every
        self.state, self.sens = state0, None

    def feed(self, x, targets, mask):
        self._hold(x, targets, mask)
        while len(self.x) >= self.every:
            if not self._run(self.every):
                return False
        return True

    def close(self):
        return self._run(len(self.x)) if self.held_steps else True

    def _run(self, n):
        t = self.trainer
        x, targets, w = self.x[:n], self.targets[:n], self.mask[:n]
        self.x, self.targets, self.mask = self.x[n:], self.targets[n:], self.mask[n:]
        loss, grads, self.state, self.sens = t.module.rtrl(
            t.params, x, targets, state0=self.state, sensitivities=self.sens, mask=w,
            l2=t.l2)
        return self._update(loss, grads, w) if w.sum() > 0 else True


class Artbp(_Engine):
    """ARTBP over a stream (seed 003): the recurrence cut at each step with probability
    c, drawn for each chunk from (seed, the trainer's update count); at each cut, the
    stretch since the last cut backpropagated (the adjoint reweighted by 1/(1 - c_t)
    inside it) and an update. The state crosses a cut as the forward pass computed it.
    Holds the stretch since the last cut: 1/c steps on average."""

    def __init__(self, trainer, state0=None):
        super().__init__(trainer)  # holds the stretch since the last cut
        self.stream_id, self.state = _ARTBP_STREAM, state0
        self.c = None  # the held steps' cut probabilities

    def feed(self, x, targets, mask, c=None):
        """c: the chunk's cut probabilities (default the trainer's c, a number)."""
        t = self.trainer
        T = x.shape[0]
        if c is None:
            if np.ndim(t.c) != 0:
                raise ValueError("a stream's ARTBP needs c a number: a schedule of cut "
                                 "probabilities has a length, and a stream has none")
            c = np.full(T, float(t.c))
        cut = np.random.default_rng([t.seed, self.stream_id, t.steps]).random(T) < c
        if self.pos == 0:
            cut[0] = False  # the stream's first step starts the first stretch
        at = self.held_steps  # where the chunk starts among the held steps
        self._hold(x, targets, mask)
        self.c = _cat(self.c, np.asarray(c, np.float64))
        for p in np.flatnonzero(cut).tolist():  # a cut before step p of the chunk
            n = at + p
            if not self._run(n, last=False):
                return False
            at -= n
        return True

    def close(self):
        return self._run(self.held_steps, last=True) if self.held_steps else True

    def _run(self, n, last):
        """Backpropagate the first n held steps, a stretch ending at a cut (last: the
        stream's end), and drop them."""
        t = self.trainer
        xs, ts, w, c = self.x[:n], self.targets[:n], self.mask[:n], self.c[:n]
        self.x, self.targets, self.mask, self.c = (a[n:] for a in
                                                   (self.x, self.targets, self.mask, self.c))
        after = None
        if not last:
            _, after = t.module.forward(t.params, xs, state0=self.state)
        if w.sum() > 0:
            loss, grads = t.loss_and_grads(xs, ts, state0=self.state, mask=w,
                                           algorithm="artbp", c=c,
                                           truncate=np.zeros(n, bool))
            if not self._update(loss, grads, w):
                return False
        self.state = after
        return True


ENGINES = {"tbptt": Tbptt, "rtrl": Rtrl, "artbp": Artbp}


def engine(trainer, state0=None):
    """The stream engine of the trainer's algorithm; a clear refusal for the others."""
    if trainer.algorithm not in ENGINES:
        raise ValueError(f"a stream trains with algorithm 'tbptt', 'rtrl' or 'artbp' (they "
                         f"look back a bounded number of steps), not {trainer.algorithm!r}: "
                         "the others need the whole sequence at once (use fit)")
    if trainer.module.SPEC["loss_at"] == "last":
        raise ValueError(f"{trainer.module.NAME} has its loss at the last step only; a "
                         "stream has no last step until it ends: use fit")
    return ENGINES[trainer.algorithm](trainer, state0)


# -- saving an engine with its Trainer -------------------------------------------------

def _flatten(value, key, arrays):
    """A JSON-able description of value, its arrays moved to arrays[key...]."""
    if isinstance(value, np.ndarray):
        arrays[key] = value
        return {"array": key}
    if isinstance(value, dict):
        return {"dict": [[k, _flatten(v, f"{key}/{k}", arrays)] for k, v in value.items()]}
    return {"value": value}


def _unflatten(desc, arrays):
    if "array" in desc:
        return arrays[desc["array"]]
    if "dict" in desc:
        return {k: _unflatten(v, arrays) for k, v in desc["dict"]}
    return desc["value"]


def save_state(stream):
    """(JSON description, {key: array}) of an engine, without its trainer."""
    arrays = {}
    desc = {name: _flatten(value, f"__stream__{name}", arrays)
            for name, value in vars(stream).items() if name != "trainer"}
    return dict(algorithm=stream.trainer.algorithm, fields=desc), arrays


def load_state(trainer, desc, arrays):
    """The engine saved by save_state, attached to trainer."""
    if desc["algorithm"] != trainer.algorithm:
        raise ValueError(f"the saved stream was trained with {desc['algorithm']!r}, not "
                         f"{trainer.algorithm!r}")
    stream = ENGINES[trainer.algorithm].__new__(ENGINES[trainer.algorithm])
    stream.trainer = trainer
    for name, d in desc["fields"].items():
        value = _unflatten(d, arrays)
        if name == "states":  # positions were JSON keys
            value = {int(k): v for k, v in value.items()}
        setattr(stream, name, value)
    return stream
