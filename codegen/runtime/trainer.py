"""The Trainer every generated module subclasses.

Parameters, optimizers (SGD, momentum, Adam), clipping, the training loop with its
online variants (tbptt here, rtrl and artbp in online.py), divergence guards and
atomic save/load, a plot of the training curve. NumPy only (tqdm for the progress
bar, matplotlib when plotting).
"""

import math

import numpy as np

from .calls import check_direction, input_width_text, pack_inputs, windows
from .progress import Progress

_NUMBER = (int, float, np.integer, np.floating)


def _all_finite(loss, arrays):
    return math.isfinite(loss) and all(np.all(np.isfinite(a)) for a in arrays.values())


class Trainer:
    """Parameters, an optimizer and a training loop around one generated module.

    Subclassed in each generated module (which sets ``module_name``). ``fit`` runs
    minibatches of whole sequences; with algorithm="tbptt" it updates online,
    every k1 steps, carrying the state forward (seed 003); with "epochwise" it
    sums the gradients of an epoch and updates once at its end (seed 001); with
    "rtrl" it updates every ``every`` steps (default 1) from the sensitivities
    carried forward, and with "artbp" at each random cut, drawn with probability
    ``c`` (codegen/online.py); "checkpoint" computes bptt's gradient in bounded memory
    (memory_limit, snapshots, segment: codegen/runtime/checkpoint.py).

    Nothing is lost silently: an update whose loss, gradients or new parameters
    are not finite stops training, restores the last parameters that gave a finite
    loss and says where (``self.diverged``); ``save`` writes the whole training
    state atomically and ``fit(resume=True)`` after ``load`` goes on from it.
    """

    module_name = None
    OPTIMIZERS = ("sgd", "momentum", "adam")

    def __init__(self, sizes, *, optimizer="sgd", lr=0.1, l2=0.0, clip=None,
                 algorithm="bptt", k1=None, k2=None, c=None, every=None, seed=0,
                 dtype=np.float32, momentum=0.9, betas=(0.9, 0.999), eps=1e-8,
                 memory_limit=None, snapshots=None, segment=None):
        import sys

        self.module = sys.modules[self.module_name]
        check_direction(self.module.NAME, self.module.SPEC, algorithm)
        if optimizer not in self.OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {self.OPTIMIZERS}, got {optimizer!r}")
        if algorithm not in self.module.ALGORITHMS:
            raise ValueError(f"algorithm must be one of {self.module.ALGORITHMS}, "
                             f"got {algorithm!r}")
        for name, value, positive in (("lr", lr, True), ("l2", l2, False), ("eps", eps, True)):
            if not (isinstance(value, _NUMBER) and math.isfinite(value)
                    and (value > 0 if positive else value >= 0)):
                kind = "positive" if positive else "non-negative"
                raise ValueError(f"{name} must be a {kind} finite number, got {value!r}")
        if clip is not None and not (isinstance(clip, _NUMBER) and clip > 0):
            raise ValueError(f"clip must be a positive number or None, got {clip!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if algorithm == "tbptt":
            windows("tbptt", 1, k1, k2)  # validates k1, k2 early
        elif k1 is not None or k2 is not None:
            raise ValueError(f"k1/k2 apply to algorithm='tbptt', not {algorithm!r}")
        from .online import trainer_options  # rtrl: update every k steps; artbp: c

        self.c, self.every = trainer_options(algorithm, c, every)
        if (snapshots is not None or segment is not None) and algorithm != "checkpoint":
            raise ValueError(f"snapshots/segment apply to algorithm='checkpoint', not "
                             f"{algorithm!r}")
        # what every loss_and_grads call of this trainer adds (memory_limit: refuse a
        # call over it; snapshots, segment: the checkpointed schedule)
        self.call_options = {k: v for k, v in (("memory_limit", memory_limit),
                                               ("snapshots", snapshots),
                                               ("segment", segment)) if v is not None}
        self.sizes = self._check_sizes(sizes)
        self.params = self.module.init_params(self.sizes, seed=seed, dtype=dtype)
        self.optimizer, self.lr, self.l2, self.clip = optimizer, lr, l2, clip
        self.algorithm, self.k1, self.k2 = algorithm, k1, k2
        self.momentum, self.betas, self.eps = momentum, tuple(betas), eps
        self.dtype = dtype
        self.seed = seed
        self._slots = {}
        self.steps = 0  # optimizer updates applied so far
        self.history = {"loss": []}  # mean loss of each finished epoch
        self.position = (0, 0)  # (epoch, minibatch) where fit(resume=True) goes on
        self._partial = None  # running sums of the epoch in progress
        self._good = None  # (steps, params) that last gave a finite loss
        self.diverged = None  # None, or the message saying where training stopped
        self.meta = {}  # what the caller stored with save(meta=...)
        self.stream = None  # the engine of an unfinished fit_stream (stream.py)

    def _check_sizes(self, sizes):
        names = self.module.SIZES
        if isinstance(sizes, (tuple, list)):
            if len(sizes) != len(names):
                raise ValueError(f"sizes must give {len(names)} values for {names}, "
                                 f"got {tuple(sizes)}")
            sizes = dict(zip(names, sizes))
        if not isinstance(sizes, dict):
            raise TypeError(f"sizes must be a dict {{size name: int}} over {names}, got "
                            f"{type(sizes).__name__}")
        missing = [s for s in names if s not in sizes]
        unknown = [s for s in sizes if s not in names]
        if missing or unknown:
            raise ValueError(f"sizes must name exactly {names}; missing {missing}, "
                             f"unknown {unknown}")
        for name, n in sizes.items():
            if not (isinstance(n, (int, np.integer)) and n >= 1):
                raise ValueError(f"size {name} must be a positive integer, got {n!r}")
        return {s: int(sizes[s]) for s in names}

    # one optimizer step ----------------------------------------------------------
    def loss_and_grads(self, x, targets, **kw):
        kw.setdefault("l2", self.l2)
        for k, v in self.call_options.items():
            kw.setdefault(k, v)
        return self.module.loss_and_grads(self.params, x, targets, **kw)

    def _clip(self, grads):
        if self.clip is None:
            return grads, None
        norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
        if norm > self.clip:
            scale = self.clip / norm
            grads = {k: g * scale for k, g in grads.items()}
        return grads, norm

    def apply(self, grads):
        """One optimizer update from gradients keyed like the parameters."""
        grads, _ = self._clip(grads)
        self.steps += 1
        for name, g in grads.items():
            p = self.params[name]
            if self.optimizer == "sgd":
                p -= (self.lr * g).astype(p.dtype)
            elif self.optimizer == "momentum":
                v = self._slots.setdefault(name, np.zeros_like(p))
                v *= self.momentum
                v += g
                p -= (self.lr * v).astype(p.dtype)
            else:
                m, v = self._slots.setdefault(name, (np.zeros_like(p), np.zeros_like(p)))
                b1, b2 = self.betas
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * g * g
                mhat = m / (1 - b1 ** self.steps)
                vhat = v / (1 - b2 ** self.steps)
                p -= (self.lr * mhat / (np.sqrt(vhat) + self.eps)).astype(p.dtype)

    def _guarded_apply(self, loss, grads):
        """apply() unless training diverges; returns False if it did."""
        if not _all_finite(loss, grads):
            what = f"loss {loss}" if not math.isfinite(loss) else "a non-finite gradient"
            return self._diverge(f"the update {self.steps + 1} got {what}", self.steps)
        self._good = (self.steps, {k: v.copy() for k, v in self.params.items()})
        with np.errstate(over="ignore", invalid="ignore"):  # detected just below
            self.apply(grads)
        bad = [k for k, v in self.params.items() if not np.all(np.isfinite(v))]
        if bad:
            return self._diverge(f"the update {self.steps} made {bad[0]} non-finite",
                                 self.steps - 1)
        return True

    def _diverge(self, what, last_finite):
        """Stop: restore the parameters that last gave a finite loss (those before
        the update that produced the bad ones)."""
        if self._good is not None and self._good[0] <= last_finite:
            self.steps, self.params = self._good[0], self._good[1]
        self.diverged = (f"training diverged: {what}; kept the parameters after update "
                         f"{self.steps}, the last that gave a finite loss (lower lr or "
                         "set clip)")
        return False

    def step(self, x, targets, mask=None):
        """One update on one minibatch; returns the loss before the update (for
        tbptt, the mean over its online updates). After a divergence the parameters
        are the last good ones and ``self.diverged`` says where."""
        x, targets = self._cast(x, targets)
        if self.algorithm == "tbptt":
            return self._online_tbptt(x, targets, mask)
        if self.algorithm in ("rtrl", "artbp"):
            from .online import trainer_step

            return trainer_step(self, x, targets, mask)
        loss, grads = self.loss_and_grads(x, targets, algorithm=self.algorithm, mask=mask)
        self._guarded_apply(loss, grads)
        return loss

    def _online_tbptt(self, x, targets, mask):
        """Every k1 steps, backpropagate the last k1 losses over the last k2 steps and
        update at once: later steps run with the updated weights (the stream engine,
        fed the minibatch as one chunk)."""
        from .stream import Tbptt, run_one

        return run_one(Tbptt(self), x, targets, mask)

    def fit_stream(self, chunks, *, progress=True, callback=None, resume=False,
                   state0=None):
        """Train with algorithm "tbptt", "rtrl" or "artbp" on one long sequence (B
        streams side by side) given as an iterable of chunks (x (t, B, I), targets[,
        mask]) of any lengths t: a generator, slices of a memory-mapped array. Memory is
        bounded whatever the length: TBPTT holds its last k1 + k2 steps, RTRL fewer than
        ``every``, ARTBP the stretch since its last cut (1/c steps on average). The
        updates of tbptt and rtrl are those of ``step`` on the whole sequence; ARTBP
        draws each chunk's cuts from (seed, update count), as step does a minibatch's.

        Returns the mean loss of the updates, also appended to ``history["loss"]``.
        ``callback(trainer, info)`` runs after each chunk (info: event "chunk", steps:
        steps received, loss: the mean so far); returning True stops, and
        ``self.stream`` is where ``save`` records it: after ``load``,
        ``fit_stream(the chunks from self.stream.pos on, resume=True)`` goes on
        exactly as the uninterrupted run."""
        import warnings

        from .stream import engine

        stream = self.stream if resume and getattr(self, "stream", None) is not None \
            else engine(self, state0)
        self.stream = stream
        self.diverged = None
        bar = Progress(None, progress, f"streaming {self.module.NAME}")
        try:
            for chunk in chunks:
                if not isinstance(chunk, tuple) or len(chunk) not in (2, 3):
                    raise TypeError("each chunk must be a tuple (x, targets) or (x, "
                                    f"targets, mask), got {type(chunk).__name__}")
                x, targets = self._cast(*chunk[:2])
                mask = chunk[2] if len(chunk) == 3 else None
                self._check_data(x, targets, mask)
                if not stream.feed(x, targets, mask):
                    warnings.warn(self.diverged, RuntimeWarning, stacklevel=2)
                    return stream.mean_loss()
                bar.update(stream.mean_loss(), n=len(x))
                if callback is not None and callback(self, dict(
                        event="chunk", steps=stream.pos, loss=stream.mean_loss())):
                    return stream.mean_loss()
            if not stream.close():
                warnings.warn(self.diverged, RuntimeWarning, stacklevel=2)
            loss = stream.mean_loss()
            self.history["loss"].append(loss)
            self.stream = None
            return loss
        finally:
            bar.close()

    # loops ---------------------------------------------------------------------
    def _input(self, x):
        """x as the module takes it: in the parameters' dtype, or integer tokens left
        as they are (a float cast would let a wrong input through as a token); a dict
        of several inputs side by side."""
        x = pack_inputs(self.module.SPEC, x)
        if self.module.SPEC.get("tokens"):
            return np.ascontiguousarray(x)
        return np.ascontiguousarray(x, dtype=self.dtype)

    def _cast(self, x, targets):
        x = self._input(x)
        if self.module.SPEC["target"] == "vector":
            targets = np.ascontiguousarray(targets, dtype=self.dtype)
        return x, targets

    def _minibatch(self, x, targets, mask, rows):
        """Sequences ``rows`` of the data, cast and contiguous. A module that holds the
        data elsewhere (distributed.DataParallel) hears which rows they are, and then
        sends their numbers rather than the data."""
        # take: contiguous, and several times faster than the fancy index x[:, rows]
        xb, tb = self._cast(np.take(x, rows, axis=1), np.take(targets, rows, axis=1))
        mb = None if mask is None else np.take(mask, rows, axis=1)
        told = getattr(self.module, "minibatch", None)
        if told is not None:
            told(rows, xb, tb, mb)
        return xb, tb, mb

    def _check_data(self, x, targets, mask):
        for name, a in (("x", x), ("targets", targets)):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
        if self.module.SPEC.get("tokens") and x.ndim != 2:
            raise ValueError(f"x must have shape (T, N) of integer tokens in [0, "
                             f"{input_width_text(self.module.SPEC)}) (time-major, N "
                             f"sequences), got {x.shape}")
        if not self.module.SPEC.get("tokens") and x.ndim != 3:
            raise ValueError(f"x must have shape (T, N, {input_width_text(self.module.SPEC)}) "
                             f"(time-major, N sequences), got {x.shape}")
        if targets.shape[:2] != x.shape[:2]:
            raise ValueError(f"targets must start with x's (T, N) = {x.shape[:2]}, got "
                             f"shape {targets.shape}")
        if mask is not None and getattr(mask, "shape", None) != x.shape[:2]:
            raise ValueError(f"mask must have shape (T, N) = {x.shape[:2]}, got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")

    def fit(self, x, targets, epochs=1, batch_size=None, progress=True, mask=None,
            callback=None, resume=False, client=None, validation=None):
        """Train on x (T, N, I) (several inputs side by side, or a dict) and targets (T, N[, O]) in minibatches of sequences.

        Returns ``self.history``, {"loss": [mean loss of each epoch]}; with
        ``validation``, held-out data (x, targets) or (x, targets, mask), also
        "val_loss": its loss (``evaluate``) after each epoch. If the loss
        becomes NaN or Inf it stops, keeps the last good parameters and sets
        ``self.diverged`` to a message saying at which update (and warns).
        ``callback(trainer, info)`` runs after every minibatch and every epoch
        (info: event "batch" or "epoch", epoch, batch, batches, loss: the
        minibatch's or the epoch's mean); returning True stops training, and
        ``self.position`` is where ``fit(..., resume=True)`` goes on (after ``load``
        of a checkpoint: the same data and batch size give the uninterrupted run).
        ``client``, a ``dask.distributed.Client``: each minibatch is split over its
        workers, with the same result (codegen/runtime/distributed.py).
        """
        import warnings

        x = pack_inputs(self.module.SPEC, x)
        if validation is not None:
            validation = self._validation(validation)
        if client is not None:
            from .distributed import fit

            return fit(self, client, x, targets, epochs=epochs, batch_size=batch_size,
                       progress=progress, mask=mask, callback=callback, resume=resume,
                       validation=validation)

        self._check_data(x, targets, mask)
        N = x.shape[1]
        batch_size = N if batch_size is None else batch_size
        if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not (isinstance(epochs, (int, np.integer)) and epochs >= 0):
            raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
        batches = -(-N // batch_size)
        if not resume:
            self.history, self.position, self._partial = {"loss": []}, (0, 0), None
        if validation is not None:
            self.history.setdefault("val_loss", [])
        epoch0, batch0 = self.position
        if batch0 > batches:
            raise ValueError(f"cannot resume at minibatch {batch0} of an epoch of "
                             f"{batches}: use the batch size and data of the saved run")
        self.diverged = None
        bar = Progress(max(0, (epochs - epoch0) * batches - batch0), progress,
                       f"training {self.module.NAME}")
        try:
            for epoch in range(epoch0, epochs):
                # The order of an epoch depends on (seed, epoch) only: a resumed run
                # sees the same minibatches as an uninterrupted one.
                order = np.random.default_rng([self.seed, epoch]).permutation(N)
                part = self._partial or {"total": 0.0, "count": 0, "grads": None}
                for b in range(batch0 if epoch == epoch0 else 0, batches):
                    idx = np.sort(order[b * batch_size:(b + 1) * batch_size])
                    xb, tb, mb = self._minibatch(x, targets, mask, idx)
                    if self.algorithm == "epochwise":
                        loss, grads = self.loss_and_grads(xb, tb, mask=mb)
                        if not _all_finite(loss, grads):
                            self._diverge(f"the loss of update {self.steps + 1} became "
                                          f"{loss}", self.steps)
                        elif part["grads"] is None:
                            part["grads"] = grads
                        else:
                            part["grads"] = {k: part["grads"][k] + grads[k] for k in grads}
                    else:
                        loss = self.step(xb, tb, mb)
                    if self.diverged:
                        warnings.warn(self.diverged, RuntimeWarning, stacklevel=2)
                        return self.history
                    part["total"] += loss * len(idx)
                    part["count"] += len(idx)
                    self._partial = part
                    self.position = (epoch, b + 1)
                    bar.update(loss)
                    if callback is not None and callback(self, dict(
                            event="batch", epoch=epoch, batch=b, batches=batches, loss=loss)):
                        return self.history
                if part["grads"] is not None:
                    grads = {k: g / batches for k, g in part["grads"].items()}
                    if not self._guarded_apply(part["total"] / part["count"], grads):
                        warnings.warn(self.diverged, RuntimeWarning, stacklevel=2)
                        return self.history
                self.history["loss"].append(part["total"] / part["count"])
                info = dict(event="epoch", epoch=epoch, batch=None, batches=batches,
                            loss=self.history["loss"][-1])
                if validation is not None:
                    info["val_loss"] = bar.held_out = self.evaluate(*validation)
                    self.history["val_loss"].append(info["val_loss"])
                self._partial = None
                self.position = (epoch + 1, 0)
                if callback is not None and callback(self, info):
                    return self.history
        finally:
            bar.close()
        return self.history

    def evaluate(self, x, targets, mask=None, state0=None):
        """The loss of the current parameters on x, targets (and mask), as a training
        step would weigh it (with its L2), without gradients: module.loss (within the
        trainer's memory_limit, in stretches of the sequence where it must)."""
        x = pack_inputs(self.module.SPEC, x)
        self._check_data(x, targets, mask)
        x, targets = self._cast(x, targets)
        return self.module.loss(self.params, x, targets, state0=state0, mask=mask,
                                l2=self.l2, memory_limit=self.call_options.get("memory_limit"))

    def _validation(self, validation):
        """fit's held-out data, (x, targets) or (x, targets, mask), checked before any
        training."""
        if not (isinstance(validation, (tuple, list)) and len(validation) in (2, 3)):
            raise TypeError("validation must be (x, targets) or (x, targets, mask), got "
                            f"{type(validation).__name__}")
        vx, vt, *vm = validation
        vx, vm = pack_inputs(self.module.SPEC, vx), (vm[0] if vm else None)
        self._check_data(vx, vt, vm)
        return vx, vt, vm

    def predict(self, x, state0=None):
        """Predictions (T, B, O) for x (T, B, I), or (T, B) tokens."""
        x = self._input(x)
        return self.module.forward(self.params, x, state0=state0)[0]

    # persistence -----------------------------------------------------------------
    def save(self, path, meta=None):
        """Write the parameters and the training state (step count, optimizer
        slots, position in fit, loss history, ``meta``: any JSON the caller adds) to
        an .npz file atomically: a temporary file in the same folder, then a rename,
        so an interrupted save leaves the previous file whole."""
        import json
        import os
        import tempfile

        if meta is not None:
            self.meta = dict(meta)
        arrays = dict(self.params)
        for name, slot in self._slots.items():
            for i, a in enumerate(slot if isinstance(slot, tuple) else (slot,)):
                arrays[f"__slot{i}__{name}"] = a
        partial = None
        if self._partial is not None:
            partial = {"total": self._partial["total"], "count": self._partial["count"]}
            for name, g in (self._partial["grads"] or {}).items():
                arrays[f"__partial__{name}"] = g
        stream = None
        if self.stream is not None:
            from .stream import save_state

            stream, stream_arrays = save_state(self.stream)
            arrays.update(stream_arrays)
        state = dict(model=self.module.NAME, sizes=self.sizes, steps=self.steps,
                     optimizer=self.optimizer, algorithm=self.algorithm,
                     position=list(self.position), history=self.history, partial=partial,
                     meta=self.meta, stream=stream)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, __model__=np.array(self.module.NAME),
                         __steps__=np.array(self.steps),
                         __state__=np.array(json.dumps(state)), **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load(self, path):
        """Read a file written by ``save``: parameters, and the training state if
        present (optimizer slots only for the same optimizer). Checks model name,
        parameter names and shapes first: on an error nothing is changed."""
        import json

        with np.load(path) as data:
            if "__model__" not in data:
                raise ValueError(f"{path} is not a bpttgen parameter file (no __model__)")
            name = str(data["__model__"])
            if name != self.module.NAME:
                raise ValueError(f"{path} holds parameters of model {name!r}, not "
                                 f"{self.module.NAME!r}")
            for key, p in self.params.items():
                if key not in data:
                    raise ValueError(f"{path} lacks parameter {key!r}")
                if data[key].shape != p.shape:
                    raise ValueError(f"{path}: {key} has shape {data[key].shape}, "
                                     f"expected {p.shape} (sizes {self.sizes})")
            params = {k: data[k].astype(self.dtype) for k in self.params}
            state = json.loads(str(data["__state__"])) if "__state__" in data else {}
            slots = {}
            if state.get("optimizer") == self.optimizer:
                for key in data.files:
                    if key.startswith("__slot"):
                        i, pname = key[len("__slot"):].split("__", 1)
                        slots.setdefault(pname, {})[int(i)] = data[key].astype(self.dtype)
            partial_grads = {key[len("__partial__"):]: data[key] for key in data.files
                             if key.startswith("__partial__")}
            stream_arrays = {key: data[key] for key in data.files
                             if key.startswith("__stream__")}
            self.params = params
            self.steps = int(data["__steps__"])
        self._slots = {k: (v[0] if len(v) == 1 else tuple(v[i] for i in sorted(v)))
                       for k, v in slots.items()}
        self.history = state.get("history", {"loss": []})
        self.position = tuple(state.get("position", (0, 0)))
        partial = state.get("partial")
        if partial is not None:
            partial["grads"] = partial_grads or None
        self._partial = partial
        self.meta = state.get("meta", {})
        self.stream = None
        if state.get("stream") is not None:
            from .stream import load_state

            self.stream = load_state(self, state["stream"], stream_arrays)
        self._good = None
        self.diverged = None
        return self

    def plot(self, path=None, *, baseline=None, title=None):
        """The training curve (mean loss of each epoch, and the held-out loss where fit
        had validation data) as a PNG at ``path`` (default <model>_training.png);
        returns the path. ``baseline``: a dashed reference line, e.g. the loss of a
        model without memory."""
        from .plots import plot_curves

        if not self.history["loss"]:
            raise ValueError("no finished epoch to plot yet: call fit() first")
        path = path or f"{self.module.NAME}_training.png"
        label = f"{self.module.NAME} {self.algorithm}"
        curves = {label: self.history["loss"]}
        if self.history.get("val_loss"):
            curves[f"{label}, held out"] = self.history["val_loss"]
        return plot_curves(curves, path, baseline=baseline, title=title,
                           ylabel="loss" if len(curves) > 1 else "training loss")
