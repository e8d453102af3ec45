"""Data-parallel training on Dask distributed: each minibatch split over workers.

``Trainer.fit(..., client=client)`` (a ``dask.distributed.Client``) lends the
trainer a ``DataParallel`` in place of its generated module for the length of the
fit. Its ``loss_and_grads`` and ``forward`` split the batch into a fixed number of
shards (the workers' count when the fit starts, so a worker that dies and comes
back changes nothing), run the generated module's own functions on each shard on
the workers, and combine the results in shard order on the driver.

Why the combination is exact. A generated module's loss is
``L = sum_tb w_tb l_tb / W + l2/2 sum ||W_k||^2`` with ``W = sum_tb w_tb``
(derive/reference.py). The loss terms of different sequences do not interact, so
with shard s holding the weight ``W_s`` and returning ``L_s``, ``g_s`` (computed
with l2 = 0):

    L = sum_s (W_s / W) L_s + l2 term,    g = sum_s (W_s / W) g_s + l2 W_k

The L2 term is added once, on the driver; a shard without loss weight (a masked
stretch) is not sent at all. The same holds for every algorithm whose gradient is
a sum over sequences at fixed weights: bptt, naive, epochwise, tbptt (the windows
are the same for every sequence; the Trainer's online tbptt carries each shard's
state with ``forward``) and artbp (its cuts are per step, shared by the batch:
drawn once on the driver and sent to every shard). Not rtrl: its sensitivities
(O(B H P) numbers per sequence) are state carried from one online update to the
next; shipping them each update costs B H times the gradient exchange, and keeping
them on the workers would make a killed worker's shard unrecoverable short of
replaying its sequences from the start. ``fit`` refuses it and says so.

What a step sends. ``fit`` puts the data (x, targets, mask, cast as the trainer
casts them) on the cluster once, and each worker keeps it under a key of its own
(``_home``, with the module); the Trainer tells the ``DataParallel`` which sequences
each minibatch holds (``minibatch``), so a step's call names its shard's sequences
and time window (``_Held``) instead of carrying the numbers. A shard is a call on
its worker's actor (``_Shard``, holding the home): one message from the client to
the worker and one back, where a task is a round trip through the scheduler before
it starts and another before its result can be fetched (with a client made
``direct_to_workers=True`` the call skips the scheduler altogether). The parameters
travel as one flat buffer inside a worker's first call of each update (a separate
call putting them there would cost a round trip before the shard could start); the
update's later calls on that worker (the online algorithms' forward passes) name
them by version, and a call that lands where they are not (a restarted worker)
fails with ``_Stale`` and goes again with them. Gradients come back as the module's
own arrays (each a buffer of the message, not copied into one first). A worker reads
its shard's rows and takes the parameters into the memory its last call used: fresh
memory is zero-filled and mapped a page at a time, and on a 2-core machine those page
faults were a quarter of elman's overhead. Everything a worker needs is on it before
its shard starts, so no fetch from another worker waits on a computing one. (The
kernels release the GIL, for split.py's threads; measured here, elman's overhead at
(64,128,256,512,256) was 8.3% and 8.8% a step with them so compiled, 10.6% and 9.4%
without: an earlier run without that split had seen the steps slower.)

Faults. The module and the data are the results of tasks that return them (not
scattered data, which a dead worker takes with it), so when a worker dies (kill -9)
the scheduler reruns its tasks on the others, with the same inputs; a shard whose
actor call fails goes again as a task, which the scheduler reruns likewise. The
shard's result is the same numbers, and the driver takes each shard's result
exactly once, in shard order, so nothing is lost or counted twice and the run
equals an uninterrupted one bit for bit. When the scheduler dies, ``fit`` puts the trainer
back to the end of its last finished minibatch (the online algorithms update within
one) and raises ``SchedulerLost``: ``save`` then writes a checkpoint that
``fit(resume=True)`` continues from.

The generated module reaches each worker once: its source goes out as one object on
the cluster, with a digest; a worker imports the module by name when its own copy
has the same digest (an installed built-in: Numba's cache is warm), or else writes
the source under the temporary folder, keyed by the digest, and imports it from
there (Numba caches beside that file, so a restarted worker loads rather than
compiles). Each worker process keeps the imported module: nothing is re-pickled or
recompiled per step. Memory: each worker holds the whole data set of a fit (and the
scheduler one copy, to recompute it from), as each process of a data-parallel fit
on one machine would read it.

dask is imported lazily: the runtime needs only NumPy and Numba.
"""

import asyncio
import hashlib
import importlib
import importlib.util
import os
import sys
import threading
import time
import uuid
from typing import NamedTuple

import numpy as np

from .calls import loss_weights
from .split import combine
from .split import rows as _rows

INSTALL = ('data-parallel training needs dask.distributed: pip install '
           '"bpttgen[distributed]" (or pip install "dask[distributed]")')

#: Algorithms whose gradient splits over the batch, and why the others do not.
SPLITS = ("bptt", "naive", "tbptt", "epochwise", "artbp")
REFUSED = {
    "rtrl": "rtrl does not split over workers: its sensitivities dS/dtheta (O(B H P) "
            "numbers) are state carried from one online update to the next, so each "
            "update would ship B*H times the gradient, and a killed worker's sequences "
            "could only be recovered by replaying them from the start; use bptt, tbptt "
            "or artbp with a client, or rtrl without one",
}


class SchedulerLost(RuntimeError):
    """The Dask scheduler went away during ``fit``; the trainer holds the state at
    the end of its last finished minibatch (``position``), ready to ``save``."""


#: Seconds a wait on the cluster lasts before the scheduler is asked whether it still
#: answers. A client whose scheduler was killed can wait on a future for ever (its
#: state never changes, nor is it cancelled: the suite once hung in gather), so every
#: wait is cut into slices of this length.
PATIENCE = 5.0

#: Seconds the list of workers is trusted before the scheduler is asked again.
LIST_AGE = 2.0


class _NoScheduler(ConnectionError):
    """A wait on the cluster found the scheduler gone."""


def _patiently(client, wait):
    """``wait(timeout)`` again until it returns; _NoScheduler once the scheduler no
    longer answers (``fit`` turns that into ``SchedulerLost``)."""
    while True:
        try:
            return wait(PATIENCE)
        except (TimeoutError, asyncio.TimeoutError):
            if _scheduler_gone(client):
                raise _NoScheduler("the Dask scheduler does not answer") from None


def _workers(client):
    """The addresses of the cluster's workers, sorted, asked of the scheduler now.

    Not ``client.scheduler_info()["workers"]``: that returns an attribute the client's
    own periodic refresh also sets, with the workers left out, and the refresh can land
    between the call's fetch and its return (1 in 6 calls with a 1 ms refresh; CI once
    saw a cluster of two with no workers)."""
    return sorted(client.nthreads())


def require_dask():
    """The ``distributed`` package, or ImportError saying what to install."""
    try:
        import distributed
    except ImportError as err:
        raise ImportError(INSTALL) from err
    return distributed


# -- on the workers -------------------------------------------------------------------
#: digest -> imported module, in each worker process: imported (and compiled) once.
_MODULES = {}


def _digest_of_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _worker_module(ref):
    """The generated module ``ref`` = (name, digest, source) names, in this process."""
    name, digest, source = ref
    module = _MODULES.get(digest)
    if module is not None:
        return module
    module = sys.modules.get(name)
    if module is None:
        try:
            module = importlib.import_module(name)
        except ImportError:
            module = None
    if module is None or _digest_of_file(getattr(module, "__file__", "") or os.devnull) \
            != digest:
        module = _import_source(name, digest, source)
    _MODULES[digest] = module
    return module


def _import_source(name, digest, source):
    """Import ``source`` from a file (Numba caches need one) under the temporary
    folder, keyed by its digest: the same path for a restarted worker, whose Numba
    cache is then warm."""
    import tempfile

    folder = os.path.join(tempfile.gettempdir(), "bpttgen-distributed", digest[:16])
    os.makedirs(folder, exist_ok=True)
    base = name.rpartition(".")[2]
    path = os.path.join(folder, base + ".py")
    if not os.path.isfile(path) or _digest_of_file(path) != digest:
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".py.tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)  # atomic: two workers on one machine may both write it
    unique = f"bpttgen_distributed_{base}_{digest[:12]}"
    spec = importlib.util.spec_from_file_location(unique, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[unique] = module
    spec.loader.exec_module(module)
    return module


def _value(value):
    return value


def _aligned(a):
    """``a``, copied when its address does not suit its dtype. Arrays Dask unpickles
    from a message can start at any byte of it (a float32 array at an odd address);
    NumPy copies from those element by element (np.take of a shard: ~10x slower) and
    Numba compiles its kernels again for unaligned arrays."""
    if isinstance(a, np.ndarray) and not a.flags.aligned:
        return np.require(a, requirements="A")
    return a


def _unflatten(layout, flat):
    """{name: view of ``flat``} for ``layout`` = ((name, shape), ...): the parameters
    travel as one buffer, not as a dict of arrays each pickled apart."""
    arrays, at = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape, dtype=np.int64))
        arrays[name] = flat[at:at + n].reshape(shape)
        at += n
    return arrays


def _reused(buffer, shape, dtype):
    """``buffer`` when it has this shape and dtype, else a new array: a step writes
    into the memory the last one used, not into new pages (which the kernel zero-fills
    and maps at a fault per page)."""
    if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
        return np.empty(shape, dtype)
    return buffer


def _flatten(arrays, layout, out=None):
    """One buffer of ``arrays`` in ``layout`` order: ``out`` when it fits."""
    parts = [np.ravel(arrays[name]) for name, _ in layout]
    out = _reused(out, (sum(p.size for p in parts),), np.result_type(*parts))
    return np.concatenate(parts, out=out)


class _Held(NamedTuple):
    """A shard's piece of the data the workers hold: ``held[field][start:stop, rows]``
    (a time window of some sequences), sent in place of the numbers themselves."""

    field: str
    start: int
    stop: int
    rows: np.ndarray


#: (thread, field) -> the array this thread's last shard read that field into, in
#: each worker process (_reused: 4 MB of fresh x cost elman's shard 2-4 ms of its
#: step). Per thread: an actor's call and a task may run at once on one worker.
_READ_INTO = {}


def _resolve(held, value):
    """``value``, or the numbers it names when it is a ``_Held``."""
    if not isinstance(value, _Held):
        return value
    field, start, stop, rows = value
    source = held[field][start:stop]
    if len(rows) and not 0 <= rows.min() <= rows.max() < source.shape[1]:
        raise IndexError(f"sequences {rows.min()}..{rows.max()} of {source.shape[1]} held")
    key = (threading.get_ident(), field)
    out = _READ_INTO[key] = _reused(_READ_INTO.get(key),
                                    (source.shape[0], len(rows)) + source.shape[2:],
                                    source.dtype)
    # take copies whole rows (a sequence's step at a time): several times faster
    # than the fancy index [start:stop, rows], and contiguous. mode="clip" (the rows
    # are checked above): with mode="raise" take writes into ``out`` through a buffer,
    # 3-10x slower.
    return np.take(source, rows, axis=1, out=out, mode="clip")


#: fit's id -> (version, flat parameters), in each worker process: the parameters of
#: the current update, which reach a worker inside its first task of that update.
_PARAMS = {}


class _Stale(RuntimeError):
    """This worker has not got the parameters a task names (the task was meant for a
    worker that died, or this process is new): the driver resends them."""


def _worker_params(layout, tag, flat):
    """The parameters ``tag`` = (fit, version) names, as views of one flat buffer:
    ``flat`` when sent (and kept for the update's later tasks), else the kept copy."""
    fit, version = tag
    if flat is not None:
        # Into the buffer of this fit's last update: Dask's message hands ``flat`` over
        # unaligned, and a new aligned copy each update (new pages, faulted in) cost
        # elman's shard 1.5 ms of its step where this copy costs 0.3. A call of the
        # last update still running (one whose step was abandoned) has its result
        # thrown away; calls of this update read the same numbers.
        buffer = _reused(_PARAMS.pop(fit, (None, None))[1], flat.shape, flat.dtype)
        np.copyto(buffer, flat)
        _PARAMS[fit] = (version, buffer)
        while len(_PARAMS) > 4:  # a few fits' worth: ended fits' buffers go
            _PARAMS.pop(next(iter(_PARAMS)))
    kept = _PARAMS.get(fit)
    if kept is None or kept[0] != version:
        raise _Stale(f"this worker lacks the parameters {tag}")
    return _unflatten(layout, kept[1])


def _shard_loss_and_grads(home, layout, tag, flat, x, targets, kw):
    """One shard's loss without L2, its gradients (the module's own arrays: Dask sends
    each as a buffer of the message, so flattening them first would only copy them
    once more), and the seconds the kernels took (reading the held data is overhead)."""
    ref, held = home
    module = _worker_module(ref)
    params = _worker_params(layout, tag, flat)
    x, targets = _resolve(held, x), _resolve(held, targets)
    kw = dict(kw, mask=_resolve(held, kw.get("mask")))
    start = time.perf_counter()
    loss, grads = module.loss_and_grads(params, x, targets, l2=0.0, **kw)
    seconds = time.perf_counter() - start
    return loss, grads, seconds


def _shard_forward(home, layout, tag, flat, x, state0):
    ref, held = home
    module = _worker_module(ref)
    params = _worker_params(layout, tag, flat)
    x = _resolve(held, x)
    start = time.perf_counter()
    y, final = module.forward(params, x, state0=state0)
    return y, final, time.perf_counter() - start


def _home(ref, held):
    """A worker's own key for the module (imported now, ahead of the first step) and
    the held data (the same objects, or aligned copies). Dask's active memory manager
    drops extra replicas of a shared key every few seconds; a worker's own key stays,
    so a shard never waits to fetch them from a worker that computes (whose kernels
    hold its GIL: it answers no fetch until they end)."""
    _worker_module(ref)
    if held is not None:  # this worker's copy, aligned (see _aligned)
        held = {k: _aligned(v) for k, v in held.items()}
    return ref, held


class _Shard:
    """A worker's actor: runs a shard's function on that worker's home. A call on an
    actor goes from the client to the worker and back (one message each way, not
    through the scheduler when the client is ``direct_to_workers``); a task is a round
    trip through the scheduler before it starts and another before its result can be
    fetched. On a 2-core machine those hops cost elman's step 45 ms of 300."""

    def __init__(self, home):
        self.home = home

    def run(self, function, *args):
        return function(self.home, *args)


# -- on the driver --------------------------------------------------------------------
def _nbytes(obj):
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, _Held):
        return obj.rows.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _window(a, whole):
    """(start, stop) when ``a`` is ``whole[start:stop]`` (a view of it along its first
    axis, as the online algorithms' windows are), else None."""
    if a is whole:
        return 0, len(whole)
    if not (isinstance(a, np.ndarray) and isinstance(whole, np.ndarray)) or \
            a.dtype != whole.dtype or a.shape[1:] != whole.shape[1:] or \
            a.strides != whole.strides or whole.strides[0] <= 0:
        return None
    offset = a.__array_interface__["data"][0] - whole.__array_interface__["data"][0]
    start, rest = divmod(offset, whole.strides[0])
    if rest or start < 0 or start + len(a) > len(whole):
        return None  # another array, or not on row boundaries
    return int(start), int(start + len(a))


class _Task(NamedTuple):
    future: object


class DataParallel:
    """A generated module whose ``loss_and_grads`` and ``forward`` run split over the
    batch on a Dask cluster; every other attribute is the module's own.

    ``shards``: how many pieces each batch is cut into (default: the workers when
    it is made). The result does not depend on which worker computes which shard,
    only on the shard count. ``trainer``: when given, its update count versions the
    parameters (sent once per update); without it each call hashes them.
    ``hold(x, targets, mask)`` keeps a fit's data on the workers; ``minibatch`` (the
    Trainer's call) says which of its sequences a step trains on, and a step then
    sends their numbers, not their data.
    ``stats`` counts calls, bytes each way and seconds: wall time per call against
    the slowest shard's kernel time (the overhead is the difference); ``tasks``, the
    shards that went as tasks rather than by their worker's actor.
    """

    def __init__(self, client, module, *, shards=None, trainer=None):
        require_dask()
        self.client, self.module, self.trainer = client, module, trainer
        if shards is None:
            shards = len(_workers(client))
        if not (isinstance(shards, (int, np.integer)) and shards >= 1):
            raise ValueError(f"the cluster has no workers (shards = {shards!r}); start "
                             "some or wait for them (client.wait_for_workers)")
        self.shards = int(shards)
        path = getattr(module, "__file__", None)
        if not path or not os.path.isfile(path):
            raise ValueError(f"module {module.__name__} has no source file to send to the "
                             "workers; import it from a file")
        with open(path) as f:
            source = f.read()
        ref = (module.__name__, hashlib.sha256(source.encode()).hexdigest(), source)
        # One object on the cluster: tasks name it, so it is not sent again.
        self._ref = self._put(ref)
        self._held = self._batch = None
        self._homes = {}  # worker -> its _home future
        self._actors = {}  # worker -> (future, actor) of its _Shard
        self._params_key = self._flat = self._layout = None
        self._id, self._version = uuid.uuid4().hex, 0
        self._sent = set()  # workers sent the current parameters
        self._listed = None  # (when, workers) of the last list asked of the scheduler
        self.stats = dict(calls=0, scatters=0, bytes_params=0, bytes_data=0, bytes_held=0,
                          bytes_results=0, wall=0.0, compute=0.0, shard_seconds=0.0,
                          tasks=0)
        self._workers()

    def __getattr__(self, name):
        return getattr(self.module, name)

    def close(self):
        """Release the module, data and parameters held on the cluster."""
        self._ref = self._held = self._batch = self._flat = self._params_key = None
        self._sent, self._homes, self._actors, self._listed = set(), {}, {}, None

    def hold(self, x, targets, mask=None):
        """Keep ``x``, ``targets`` and ``mask`` (a fit's data, as its Trainer slices
        them) on every worker until ``close``: sent once, not once per step."""
        data = {"x": x, "targets": targets, "mask": mask}
        self._held = self._put(data)
        self.stats["bytes_held"] += _nbytes(data)
        self._homes, self._actors, self._listed = {}, {}, None
        self._workers()

    def minibatch(self, rows, x, targets, mask):
        """The Trainer's minibatch is sequences ``rows`` of the held data: calls on
        these arrays (or windows of their time axis) send ``rows``, not numbers."""
        self._batch = (np.asarray(rows), {"x": x, "targets": targets, "mask": mask})

    def _workers(self):
        """The workers now, in a fixed order; each has its home (the module and the
        held data) before it gets a shard: fetched while no worker computes. The list
        is the scheduler's, asked again after a failed call and at most every
        ``LIST_AGE`` seconds: asking costs a round trip to the scheduler (1 ms a step
        of elman's 10% budget at (64,128,256,512,256)), and a worker gone is found by
        the call that fails on it anyway."""
        from distributed import wait

        now = time.monotonic()
        if self._listed is not None and now - self._listed[0] < LIST_AGE:
            return self._listed[1]
        workers = _workers(self.client)
        while not workers:  # all dead (kill -9) and their nannies not yet back: wait
            _patiently(self.client, lambda t: self.client.wait_for_workers(1, timeout=t))
            workers = _workers(self.client)
        new = {w: self.client.submit(_home, self._ref, self._held, pure=False, workers=[w],
                                     allow_other_workers=True)
               for w in workers if w not in self._homes}
        if new:
            _patiently(self.client, lambda t: wait(list(new.values()), timeout=t))
            self._homes.update(new)
        for w in set(self._actors) - set(workers):  # gone: its actor's task goes too
            del self._actors[w]
        for w in workers:
            if w not in self._actors:
                self._actors[w] = self._actor(w)
        self._listed = (now, workers)
        return workers

    def _actor(self, worker):
        """The actor computing shards on ``worker``, or None where it cannot be made
        (the worker left meanwhile): its shards then go as tasks."""
        try:
            future = self.client.submit(_Shard, self._homes[worker], actor=True,
                                        workers=[worker], pure=False)
            # bounded: a worker that died after it was listed never runs it
            actor = future.result(timeout=60)
        except Exception:  # noqa: BLE001 - a worker gone: tasks do its shards
            return None
        # A call to an actor whose worker died would otherwise wait for the actor's
        # own future, which the scheduler cannot rerun on a worker that is gone: the
        # call fails at once instead, and the shard goes again as a task (_run).
        actor._future = None
        return future, actor

    # parameters, once per update
    def _params(self, params):
        """The parameters as one flat buffer, new when they changed."""
        if self.trainer is not None and params is self.trainer.params:
            key = ("update", self.trainer.steps, id(params),
                   tuple(id(a) for a in params.values()))
        else:
            h = hashlib.sha256()
            for name, a in params.items():
                h.update(name.encode())
                h.update(np.ascontiguousarray(a).view(np.uint8).reshape(-1))
            key = ("hash", h.hexdigest())
        if key != self._params_key:
            self._layout = tuple((k, v.shape) for k, v in params.items())
            # A copy (later edits of params stay here), into the last update's buffer:
            # every call of that update has returned, so its messages have gone.
            self._flat = _flatten(params, self._layout, self._flat)
            self._params_key, self._sent = key, set()
            self._version += 1
            self.stats["scatters"] += 1

    def _put(self, value):
        """``value`` on the cluster as the result of a task that returns it, not as
        scattered data: if every worker holding it dies, the scheduler recomputes it
        from the task (scattered data would be lost, and the tasks needing it fail)."""
        import dask

        # Dask warns of a graph over 10 MB (the held data): here that is the point.
        with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1 TiB"}):
            return self.client.submit(_value, value, pure=False)

    def _pieces(self, B):
        edges = np.linspace(0, B, min(self.shards, B) + 1).round().astype(int)
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]

    def _piece(self, field, a, lo, hi, axis=1):
        """Rows lo:hi of argument ``a``: a ``_Held`` naming them when ``a`` is (a time
        window of) the minibatch's ``field`` and the workers hold the data; else the
        numbers."""
        if a is not None and self._held is not None and self._batch is not None:
            window = _window(a, self._batch[1][field])
            if window is not None:
                return _Held(field, *window, self._batch[0][lo:hi])
        return _rows(a, lo, hi, axis)

    def _run(self, function, calls):
        """Shard i on worker i (mod their number), by that worker's actor; their
        results in shard order. The parameters travel inside a worker's first call of
        an update (a separate call putting them there would cost a round trip before
        the shard could start); later calls name them. A shard whose actor call fails
        (its worker died, or lacks the parameters) goes again as a task, with them:
        the scheduler reruns a task, and what it needs, on a worker that lives."""
        from distributed import wait

        workers = self._workers()
        tag = (self._id, self._version)
        pending = []
        for i, args in enumerate(calls):
            w = workers[i % len(workers)]
            pending.append(self._submit(w, function, tag, w not in self._sent, args,
                                        actor=True))
            self._sent.add(w)
        self.stats["bytes_data"] += _nbytes(calls)
        results, tasks = [None] * len(calls), {}
        for i, call in enumerate(pending):
            if isinstance(call, _Task):
                tasks[i] = call.future
                continue
            try:
                results[i] = _patiently(self.client, call.result)
            except _NoScheduler:
                raise
            except Exception as err:  # noqa: BLE001 - a real failure raises again below
                w = workers[i % len(workers)]
                if not isinstance(err, _Stale):
                    self._actors.pop(w, None)  # its worker is gone: _workers() remakes it
                    self._listed = None  # and asks the scheduler who is left
                tasks[i] = self._submit(w, function, tag, True, calls[i]).future
        while tasks:
            futures = list(tasks.values())
            _patiently(self.client, lambda t: wait(futures, timeout=t))
            try:
                # From the workers straight, not relayed through the scheduler.
                done = self.client.gather(futures, direct=True)
            except _Stale:  # a task ran where the parameters are not: send them
                tasks = {i: self._submit(workers[i % len(workers)], function, tag, True,
                                         calls[i]).future
                         if f.status == "error" and isinstance(f.exception(), _Stale) else f
                         for i, f in tasks.items()}
                continue
            for i, r in zip(tasks, done):
                results[i] = r
            break
        self.stats["calls"] += 1
        self.stats["bytes_results"] += _nbytes([r[:-1] for r in results])
        self.stats["compute"] += max(r[-1] for r in results)
        self.stats["shard_seconds"] += sum(r[-1] for r in results)
        return results

    def _submit(self, worker, function, tag, send, args, actor=False):
        """``function(home, layout, tag, flat, *args)`` on ``worker``: an actor's call
        (something with ``result()``) when ``actor`` and the worker has one, else a
        ``_Task``. ``flat`` is the parameters when ``send``, else None."""
        flat = self._flat if send else None
        if send:
            self.stats["bytes_params"] += self._flat.nbytes
        if actor and self._actors.get(worker) is not None:
            return self._actors[worker][1].run(function, self._layout, tag, flat, *args)
        self.stats["tasks"] += 1
        return _Task(self.client.submit(function, self._homes[worker], self._layout, tag,
                                        flat, *args, pure=False, workers=[worker],
                                        allow_other_workers=True))

    def loss_and_grads(self, params, x, targets, *, state0=None, mask=None, l2=0.0,
                       algorithm="bptt", **kw):
        """As the module's ``loss_and_grads``, the batch split over the workers."""
        if algorithm in REFUSED:
            raise ValueError(REFUSED[algorithm])
        start = time.perf_counter()
        T, B = x.shape[:2]
        dtype = params[next(iter(params))].dtype
        loss_weights(self.module.SPEC, T, B, mask, dtype)  # refuses a batch without loss
        if algorithm == "artbp" and kw.get("truncate") is None and kw.get("c") is not None:
            # One draw of the cuts for the whole batch, as one process makes it.
            from .online import _generator, truncation_schedule

            kw["truncate"] = _generator(kw.pop("seed", None)).random(T) < \
                truncation_schedule(kw["c"], T)
        pieces, weights = [], []
        for lo, hi in self._pieces(B):
            m = None if mask is None else _rows(mask, lo, hi, 1)
            _, w = loss_weights(self.module.SPEC, T, hi - lo, m, dtype, allow_empty=True)
            if w > 0:  # a shard without loss terms adds nothing
                pieces.append((lo, hi))
                weights.append(w)
        self._params(params)
        results = self._run(_shard_loss_and_grads, [
            (self._piece("x", x, lo, hi), self._piece("targets", targets, lo, hi),
             dict(kw, algorithm=algorithm, mask=self._piece("mask", mask, lo, hi),
                  state0=_rows(state0, lo, hi, 0)))
            for lo, hi in pieces])
        # in shard order: deterministic
        loss, grads = combine(weights, [(loss_s, grads_s) for loss_s, grads_s, _ in results])
        if l2:  # once, not once per shard: the module's penalty on its weight matrices
            for name, role in self.module.SPEC["roles"].items():
                if role == "weight":
                    penalty, gradient = self.module._l2(params[name], l2)  # as derived
                    loss += penalty
                    grads[name] = grads[name] + gradient
        # The whole call, parameters out, slicing and sums included, is the wall time.
        self.stats["wall"] += time.perf_counter() - start
        return float(loss), grads

    def loss(self, params, x, targets, **kw):
        """The module's ``loss``, computed here (a held-out loss after an epoch: a
        third of a step's work, not worth sending)."""
        return self.module.loss(params, x, targets, **kw)

    def forward(self, params, x, state0=None):
        """As the module's ``forward``, the batch split over the workers."""
        start = time.perf_counter()
        pieces = self._pieces(x.shape[1])
        self._params(params)
        results = self._run(_shard_forward, [
            (self._piece("x", x, lo, hi), _rows(state0, lo, hi, 0)) for lo, hi in pieces])
        y = np.concatenate([r[0] for r in results], axis=1)
        final = {s: np.concatenate([r[1][s] for r in results], axis=0)
                 for s in results[0][1]}
        self.stats["wall"] += time.perf_counter() - start
        return y, final

    def rtrl(self, *args, **kw):
        raise ValueError(REFUSED["rtrl"])


# -- the Trainer's hook ---------------------------------------------------------------
def _snapshot(trainer):
    """What an update within a minibatch changes (online tbptt and artbp)."""
    import copy

    return dict(params={k: v.copy() for k, v in trainer.params.items()},
                slots=copy.deepcopy(trainer._slots), steps=trainer.steps,
                history=copy.deepcopy(trainer.history), position=trainer.position,
                partial=copy.deepcopy(trainer._partial))


def _restore(trainer, snap):
    trainer.params, trainer._slots, trainer.steps = snap["params"], snap["slots"], snap["steps"]
    trainer.history, trainer.position = snap["history"], snap["position"]
    trainer._partial, trainer._good = snap["partial"], None


def _scheduler_gone(client):
    """True when the client has lost its scheduler (not a worker, not a bug)."""
    if client.status in ("closing", "closed", "connecting", "failed"):
        return True
    try:
        client.run_on_scheduler(os.getpid)
    except Exception:  # noqa: BLE001 - any failure to reach it means it is gone
        return True
    return False


def fit(trainer, client, x, targets, *, callback=None, **kw):
    """``trainer.fit`` with each minibatch split over ``client``'s workers."""
    if trainer.algorithm in REFUSED:
        raise ValueError(REFUSED[trainer.algorithm])
    dp = DataParallel(client, trainer.module, trainer=trainer)
    # The workers hold the data, cast as the trainer casts each minibatch; a step
    # sends the numbers of its sequences (Trainer._minibatch tells dp which).
    trainer._check_data(x, targets, kw.get("mask"))
    x, targets = trainer._cast(x, targets)
    dp.hold(x, targets, kw.get("mask"))
    address = getattr(client.scheduler, "address", None) or "its address"
    online = trainer.algorithm in ("tbptt", "artbp")  # they update within a minibatch
    state = {"snap": _snapshot(trainer) if online else None}

    def hook(tr, info):
        if online:
            state["snap"] = _snapshot(tr)
        return callback(tr, info) if callback is not None else None

    module, trainer.module = trainer.module, dp
    try:
        return trainer.fit(x, targets, callback=hook, **kw)
    except Exception as err:
        if not _scheduler_gone(client):
            raise
        if online:
            _restore(trainer, state["snap"])
        epoch, batch = trainer.position
        raise SchedulerLost(
            f"lost the Dask scheduler at {address}; the trainer is back at the end of its "
            f"last finished minibatch ({batch} of epoch {epoch + 1}, {trainer.steps} "
            "updates): save it, and fit(..., resume=True) goes on from there") from err
    finally:
        trainer.module = module
        dp.close()
