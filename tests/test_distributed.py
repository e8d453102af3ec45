"""Data-parallel training on Dask (codegen/runtime/distributed.py): the split gradient
equals one process's, the module and the parameters reach the workers once, a worker
killed with kill -9 changes nothing, a dead scheduler leaves a checkpoint that
``--resume`` continues from.

One 2-worker LocalCluster (processes, one thread each) serves the whole file. Float64
and tiny sizes; no timing is asserted.
"""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from bpttgen.codegen.app import cli, tasks  # noqa: E402
from bpttgen.codegen.runtime import distributed as dist  # noqa: E402
from bpttgen.derive.models import BUILTIN  # noqa: E402

SPLIT = [("bptt", {}), ("naive", {}), ("tbptt", dict(k1=2, k2=3)), ("epochwise", {}),
         ("artbp", dict(c=0.3, seed=4))]


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0")
    c = distributed.Client(cluster, direct_to_workers=True)  # as train --workers
    c.wait_for_workers(2, timeout=300)  # a failure, never a hang
    yield c
    c.close()
    cluster.close()


def _module(name):
    return importlib.import_module(f"bpttgen.generated.{name}")


def _problem(m, T=5, B=5, seed=0):
    """float64 params, x, targets, state0 and a mask with zero weights, sizes 3, 4, ..."""
    sizes = {s: 3 + i for i, s in enumerate(m.SIZES)}
    params = m.init_params(sizes, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, sizes[m.SPEC["inputs"][0][1]], (T, B)) if m.SPEC["tokens"] else
         rng.standard_normal((T, B, sizes[m.SPEC["inputs"][0][1]])))
    O = sizes[m.SPEC["output"][1]]
    targets = (rng.integers(0, O, (T, B)) if m.SPEC["target"] == "index"
               else rng.standard_normal((T, B, O)))
    state0 = {s: 0.5 * rng.standard_normal((B, sizes[size])) for s, size in m.STATES.items()}
    mask = rng.random((T, B))
    mask[:, 1] = 0  # a sequence without loss
    mask[2] = 0  # a step without loss
    return params, x, targets, state0, mask


def _relative(a, b):
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-300))
               for k in b)


# -- the split gradient is one process's --------------------------------------------------
@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_split_gradients_equal_one_process(client, name):
    """Every built-in, every algorithm that splits: loss and gradients to 1e-12, with
    a mask, initial states and L2; the batch of 5 is cut 2 + 3 (unequal weights)."""
    m = _module(name)
    params, x, targets, state0, mask = _problem(m)
    dp = dist.DataParallel(client, m)
    assert dp.shards == 2
    for algorithm, kw in SPLIT:
        if algorithm not in m.ALGORITHMS:  # a reverse state: no online algorithm
            continue
        want = m.loss_and_grads(params, x, targets, state0=state0, mask=mask, l2=0.1,
                                algorithm=algorithm, **kw)
        got = dp.loss_and_grads(params, x, targets, state0=state0, mask=mask, l2=0.1,
                                algorithm=algorithm, **kw)
        assert abs(got[0] - want[0]) <= 1e-12 * abs(want[0]), (algorithm, got[0], want[0])
        assert _relative(got[1], want[1]) <= 1e-12, algorithm
    y, final = dp.forward(params, x, state0=state0)
    y1, final1 = m.forward(params, x, state0=state0)
    assert np.allclose(y, y1, rtol=1e-12, atol=0)
    assert all(np.allclose(final[s], final1[s], rtol=1e-12, atol=1e-15) for s in final1)


def test_a_shard_without_loss_weight_is_skipped(client):
    m = _module("elman")
    params, x, targets, state0, mask = _problem(m)
    mask[:, :2] = 0  # the whole first shard
    dp = dist.DataParallel(client, m)
    want = m.loss_and_grads(params, x, targets, mask=mask)
    got = dp.loss_and_grads(params, x, targets, mask=mask)
    assert _relative(got[1], want[1]) <= 1e-12
    # only the second shard went out: 3 of 5 sequences' x, targets and mask
    assert dp.stats["bytes_data"] == (x.nbytes + targets.nbytes + mask.nbytes) * 3 // 5
    mask[:] = 0
    with pytest.raises(ValueError, match="selects no loss term"):
        dp.loss_and_grads(params, x, targets, mask=mask)


def test_the_workers_are_counted_while_the_client_refreshes_its_view(client):
    """Regression (CI saw a two-worker cluster counted as none): the client's periodic
    refresh of ``scheduler_info()`` leaves the workers out and can land inside that call;
    with a 1 ms refresh, about 1 call in 6 came back empty. The count asks the scheduler."""
    import dask

    with dask.config.set({"distributed.client.scheduler-info-interval": "1ms"}):
        refreshing = distributed.Client(client.scheduler.address, direct_to_workers=True)
    try:
        m = _module("elman")
        for _ in range(300):
            assert len(dist._workers(refreshing)) == 2
        assert dist.DataParallel(refreshing, m).shards == 2
    finally:
        refreshing.close()


def test_a_workers_reused_buffers_hold_each_calls_own_numbers():
    """A worker reads a shard's rows, and takes an update's parameters, into the memory
    its last call used: each call still sees its own numbers, and a row outside the
    held data is refused (np.take's mode="clip" would read the last row instead)."""
    held = {"x": np.arange(4 * 6 * 2, dtype=np.float64).reshape(4, 6, 2)}
    first = dist._resolve(held, dist._Held("x", 1, 3, np.array([4, 0])))
    assert np.array_equal(first, held["x"][1:3][:, [4, 0]])
    again = dist._resolve(held, dist._Held("x", 0, 2, np.array([5, 2])))
    assert np.shares_memory(first, again)  # the same memory, now the second call's rows
    assert np.array_equal(again, held["x"][0:2][:, [5, 2]])
    with pytest.raises(IndexError, match="sequences 2..6 of 6"):
        dist._resolve(held, dist._Held("x", 0, 2, np.array([2, 6])))
    layout = (("W", (2, 3)), ("b", (2,)))
    fit = "test-reused-params"
    one = dist._worker_params(layout, (fit, 1), np.arange(8.0))
    two = dist._worker_params(layout, (fit, 2), np.arange(8.0) + 10)
    assert np.shares_memory(one["W"], two["W"])
    assert np.array_equal(two["W"], np.arange(6.0).reshape(2, 3) + 10)
    assert np.array_equal(dist._worker_params(layout, (fit, 2), None)["b"], [16.0, 17.0])
    with pytest.raises(dist._Stale):
        dist._worker_params(layout, (fit, 1), None)  # the last update's are gone
    dist._PARAMS.pop(fit)


def test_rtrl_does_not_split_and_says_why(client):
    m = _module("elman")
    params, x, targets, _, _ = _problem(m)
    with pytest.raises(ValueError, match="sensitivities"):
        dist.DataParallel(client, m).loss_and_grads(params, x, targets, algorithm="rtrl")
    tr = m.Trainer({"I": 3, "H": 4, "O": 5}, algorithm="rtrl", dtype=np.float64)
    with pytest.raises(ValueError, match="rtrl does not split"):
        tr.fit(x, targets, progress=False, client=client)


# -- the module and the parameters go out once --------------------------------------------
def _loaded(client):
    """{worker: [(digest, file)]} of the modules each worker process imported."""
    def probe():
        return [(d, m.__file__) for d, m in dist._MODULES.items()]
    return client.run(probe)


def test_module_once_parameters_once_per_update(client):
    m = _module("lstm")
    params, x, targets, _, _ = _problem(m)
    dp = dist.DataParallel(client, m)
    for _ in range(3):
        dp.loss_and_grads(params, x, targets)
    dp.forward(params, x)
    assert dp.stats["scatters"] == 1 and dp.stats["calls"] == 4
    assert dp.stats["tasks"] == 0  # every shard by its worker's actor
    flat = sum(p.nbytes for p in params.values())
    assert dp.stats["bytes_params"] == 2 * flat  # one buffer to each worker, once
    params = {k: v * 0.5 for k, v in params.items()}
    dp.loss_and_grads(params, x, targets)
    assert dp.stats["scatters"] == 2 and dp.stats["bytes_params"] == 4 * flat
    for worker, modules in _loaded(client).items():
        files = [f for _, f in modules if f == m.__file__]
        assert files == [m.__file__], (worker, modules)  # the installed file, by name, once


def test_a_worker_without_the_parameters_gets_them_again(client):
    """A task that lands where its parameters are not (a worker restarted, or one
    doing a dead worker's shard) fails with _Stale and goes again with them."""
    m = _module("elman")
    params, x, targets, state0, _ = _problem(m)
    dp = dist.DataParallel(client, m)
    dp.loss_and_grads(params, x, targets)

    def forget():
        dist._PARAMS.clear()
    client.run(forget)
    sent = dp.stats["bytes_params"]
    y, final = dp.forward(params, x, state0=state0)
    assert dp.stats["bytes_params"] == 2 * sent  # both sent again
    assert dp.stats["tasks"] == 2  # each as a task, after its actor's call was refused
    y1, final1 = m.forward(params, x, state0=state0)
    assert np.allclose(y, y1, rtol=1e-12, atol=0)


def test_a_module_the_workers_cannot_import_goes_as_source(client, tmp_path):
    """A module imported from a file the workers cannot import by name (a user's cell
    generated into a folder) is sent as source and imported from a file there, once.
    (This one borrows elman's kernels, so no test compiles them afresh.)"""
    from bpttgen.codegen.generate import import_path

    path = tmp_path / "users_cell.py"
    path.write_text('"""A module only this folder holds."""\n'
                    "from bpttgen.generated.elman import *  # noqa: F401,F403\n")
    m = import_path(str(path), "bpttgen_test_users_cell")
    try:
        params, x, targets, state0, mask = _problem(m)
        want = _module("elman").loss_and_grads(params, x, targets, mask=mask)
        dp = dist.DataParallel(client, m)
        for _ in range(2):
            got = dp.loss_and_grads(params, x, targets, mask=mask)
            assert _relative(got[1], want[1]) <= 1e-12
        for modules in _loaded(client).values():
            ours = [f for _, f in modules if f.endswith("bpttgen_test_users_cell.py")]
            assert len(ours) == 1 and "bpttgen-distributed" in ours[0], modules
    finally:
        sys.modules.pop("bpttgen_test_users_cell", None)


# -- Trainer.fit(client=) ---------------------------------------------------------------
def _trainer(m, algorithm="bptt", optimizer="sgd", **kw):
    return m.Trainer({"I": 1, "H": 6, "O": 2}, optimizer=optimizer, lr=0.1, l2=0.01,
                     algorithm=algorithm, seed=0, dtype=np.float64, **kw)


@pytest.mark.parametrize("algorithm, kw", [("bptt", {}), ("epochwise", {}),
                                           ("tbptt", dict(k1=3, k2=4)), ("artbp", dict(c=0.3))])
def test_fit_equals_one_process(client, algorithm, kw):
    m = _module("elman")
    data = tasks.parity(8, 40, seed=1)
    mask = np.random.default_rng(0).random(data.x.shape[:2])
    held = tasks.parity(8, 6, seed=2)
    one, split = _trainer(m, algorithm, **kw), _trainer(m, algorithm, **kw)
    one.fit(data.x, data.targets, epochs=2, batch_size=16, mask=mask, progress=False,
            validation=(held.x, held.targets))
    split.fit(data.x, data.targets, epochs=2, batch_size=16, mask=mask, progress=False,
              client=client, validation=(held.x, held.targets))
    assert split.steps == one.steps
    assert split.module is m  # handed back after the fit
    assert _relative(split.params, one.params) <= 1e-12
    for key in ("loss", "val_loss"):
        assert len(split.history[key]) == 2
        assert np.allclose(split.history[key], one.history[key], rtol=1e-12, atol=0), key


def test_a_step_sends_the_parameters_not_the_data(client, monkeypatch):
    """In a fit the workers hold the data: a step's tasks carry the parameters (one
    flat buffer) and the numbers of their shard's sequences, not x, targets or mask."""
    m = _module("elman")
    data = tasks.parity(8, 40, seed=1)
    mask = np.random.default_rng(0).random(data.x.shape[:2])
    sent, submit = [], dist.DataParallel._submit

    def recording(self, worker, function, tag, send, args, actor=False):
        sent.append((function, self._flat if send else None, *args))
        return submit(self, worker, function, tag, send, args, actor)
    monkeypatch.setattr(dist.DataParallel, "_submit", recording)
    tr = _trainer(m)
    tr.fit(data.x, data.targets, epochs=2, batch_size=16, mask=mask, progress=False,
           client=client)
    P = sum(p.size for p in tr.params.values())
    assert tr.steps == 6 and len(sent) == 2 * 6  # 3 minibatches an epoch, 2 shards each
    for function, flat, x, targets, kw in sent:
        assert function is dist._shard_loss_and_grads
        assert flat.dtype == np.float64 and flat.shape == (P,)  # bptt: new every step
        for piece in (x, targets, kw["mask"]):
            assert isinstance(piece, dist._Held) and piece.rows.dtype.kind == "i", piece
            assert len(piece.rows) in (4, 8)  # half of a minibatch of 16 or of 8
        assert not [k for k, v in kw.items() if isinstance(v, np.ndarray)], kw


# -- faults --------------------------------------------------------------------------------
def test_a_worker_killed_mid_epoch_changes_nothing(client):
    """kill -9 of a worker process, once between steps and once during one: its shards
    are recomputed elsewhere, each taken once in shard order, and the final parameters
    are those of the uninterrupted run, bit for bit."""
    m = _module("elman")
    data = tasks.parity(12, 64, seed=2)

    def run(kills):
        client.wait_for_workers(2, timeout=300)  # two shards in every run
        # Each kill takes a worker that was there from the start, never one its nanny
        # is still restarting: a nanny whose worker dies while it starts gives it up.
        pids = sorted(client.run(os.getpid).values())
        tr = _trainer(m, "tbptt", optimizer="adam", k1=4, k2=6)

        def callback(tr, info):
            when = kills.get((info["event"], info["epoch"], info["batch"]))
            if when is not None:
                pid = pids.pop()
                if when == 0:
                    os.kill(pid, signal.SIGKILL)
                else:  # during the next step
                    threading.Timer(when, os.kill, (pid, signal.SIGKILL)).start()

        tr.fit(data.x, data.targets, epochs=3, batch_size=16, progress=False,
               callback=callback, client=client)
        return tr

    clean = run({})
    killed = run({("batch", 0, 1): 0, ("batch", 1, 2): 0.005})
    assert killed.steps == clean.steps
    for k in clean.params:
        assert np.array_equal(killed.params[k], clean.params[k]), k
    assert killed.history == clean.history
    client.wait_for_workers(2, timeout=300)  # a failure here, never a hang


def _start_scheduler(folder):
    """A scheduler and two workers in their own processes, as on a real cluster."""
    file = os.path.join(folder, "scheduler.json")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                                  "--scheduler-file", file, "--port", "0", "--no-dashboard"],
                                 **quiet)
    address = None
    while address is None:  # the file may be there before it is written whole
        assert scheduler.poll() is None, "the scheduler did not start"
        try:
            with open(file) as f:
                address = json.load(f)["address"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    workers = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                 "--nthreads", "1", "--no-dashboard"], **quiet)
               for _ in range(2)]
    with distributed.Client(address) as c:  # both there: two shards from the first step
        c.wait_for_workers(2, timeout=300)
    return address, scheduler, workers


def test_a_dead_scheduler_leaves_a_checkpoint_that_resume_continues(client, tmp_path,
                                                                    monkeypatch, capsys):
    import dask

    monkeypatch.chdir(tmp_path)
    address, scheduler, workers = _start_scheduler(str(tmp_path))
    common = ["train", "elman", "--task", "parity", "--seq-len", "8", "--samples", "48",
              "--batch-size", "16", "--hidden", "6", "--dtype", "float64", "--algorithm",
              "tbptt", "--k1", "3", "--k2", "4", "--no-plot", "-q"]
    try:
        ckpt = tmp_path / "run.ckpt.npz"

        def kill_when_checkpointed():
            while not ckpt.exists():
                time.sleep(0.01)
            scheduler.send_signal(signal.SIGKILL)

        threading.Thread(target=kill_when_checkpointed, daemon=True).start()
        # How long the client waits for the scheduler to come back before giving up.
        with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
            code = cli.main(common + ["--epochs", "1000", "--checkpoint-every", "1",
                                      "--scheduler", address, "-o", "run.npz"])
        err = capsys.readouterr().err
        assert code == cli.EXIT_FAILED, err
        assert "lost the Dask scheduler" in err and "--resume" in err, err
        assert not (tmp_path / "run.npz").exists()
    finally:
        for p in [scheduler] + workers:
            p.kill()
            p.wait()
    with np.load(ckpt) as f:
        state = json.loads(str(f["__state__"]))
    epoch, batch = state["position"]
    assert epoch < 1000
    # --resume on another cluster (the module's, two workers: the same two shards), to
    # two epochs past the checkpoint; then the same run without the interruption.
    ours = client.scheduler.address
    epochs = str(epoch + 2)
    assert cli.main(common + ["--epochs", epochs, "--scheduler", ours, "-o", "run.npz",
                              "--resume"]) == 0
    assert cli.main(common + ["--epochs", epochs, "--scheduler", ours, "-o", "clean.npz"]) == 0
    with np.load("run.npz") as a, np.load("clean.npz") as b:
        for k in ("W_xh", "W_hh", "b_h", "W_hy", "b_y"):
            assert np.array_equal(a[k], b[k]), k


def test_workers_without_dask_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed fails
    code = cli.main(["train", "elman", "--task", "parity", "--samples", "8", "--epochs", "1",
                     "--workers", "2", "--no-plot", "-q", "-o", str(tmp_path / "x.npz")])
    assert code == cli.EXIT_USAGE
    assert 'pip install "bpttgen[distributed]"' in capsys.readouterr().err


def test_a_wait_ends_when_the_scheduler_is_gone(monkeypatch):
    """A wait on the cluster is cut into slices, the scheduler asked between them: a
    client whose scheduler was killed can wait on a future for ever (the suite hung in
    gather so, 3 runs in 4 under load, before this)."""
    monkeypatch.setattr(dist, "PATIENCE", 0.0)
    calls = []

    def times_out_twice(timeout):
        calls.append(timeout)
        if len(calls) < 3:
            raise TimeoutError
        return "done"

    monkeypatch.setattr(dist, "_scheduler_gone", lambda client: False)
    assert dist._patiently(None, times_out_twice) == "done" and len(calls) == 3
    monkeypatch.setattr(dist, "_scheduler_gone", lambda client: True)
    calls.clear()
    with pytest.raises(ConnectionError, match="does not answer"):
        dist._patiently(None, times_out_twice)
    assert len(calls) == 1
