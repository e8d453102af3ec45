"""Checkpointed BPTT (codegen/runtime/checkpoint.py): the schedule is the binomial
optimum, the gradient is bptt's, memory() announces what a call allocates, and a
call over its memory_limit is refused with the plan that fits."""

import tracemalloc
from functools import lru_cache

import numpy as np
import pytest

from bpttgen.codegen.runtime import calls, checkpoint
from bpttgen.codegen.runtime.gradcheck import max_relative_error, random_problem


@lru_cache(maxsize=None)
def least_advances(n, s):
    """Exhaustive search: the fewest segment forwards reversing n segments with s
    snapshots besides the start's (the recurrence of Griewank's proof)."""
    if n <= 1:
        return 0
    if s == 0:
        return n * (n - 1) // 2
    return min(m + least_advances(n - m, s - 1) + least_advances(m, s) for m in range(1, n))


def replay(n, s):
    """Run a schedule's actions on a model of the memory; (advances, most snapshots
    held at once, the order segments were swept in)."""
    held, at, advances, most, swept = {0}, None, 0, 1, []
    for action, *where in checkpoint.schedule(n, s):
        if action == "advance":
            a, m = where
            assert a in held, f"advance from {a}, not a snapshot"
            advances, at = advances + m - a, m
        elif action == "store":
            assert at == where[0]
            held.add(where[0])
            most = max(most, len(held))
        elif action == "free":
            held.discard(where[0])
        else:
            assert where[0] in held or at == where[0], f"segment {where[0]}: no state"
            swept.append(where[0])
            at = None
    return advances, most, swept


@pytest.mark.parametrize("s", range(6))
def test_schedule_is_the_binomial_optimum(s):
    for n in range(1, 40):
        advances, most, swept = replay(n, s)
        assert swept == list(range(n - 1, -1, -1))
        assert most <= s + 1
        assert advances == least_advances(n, s) == checkpoint.advances(n, s), (n, s)


def test_snapshot_at_every_boundary_is_one_extra_forward():
    # the sqrt schedule: n segments, n - 1 snapshots, each segment run once before its
    # sweep (the last one's trajectory is not rerun at all)
    assert replay(50, 49)[0] == 49


@pytest.fixture(scope="module")
def problems():
    import importlib

    def get(name, T=7, B=3):
        module = importlib.import_module(f"bpttgen.generated.{name}")
        return module, random_problem(module, T=T, B=B, seed=1)
    return get


PLANS = [dict(), dict(segment=2, snapshots=1), dict(segment=3, snapshots=0),
         dict(segment=1, snapshots=2), dict(segment=100)]


#: Built-ins of every kind (one state, two, stacked, a reduction); the fuzzer runs
#: checkpoint on every cell it draws, and bpttgen check on any model.
MODELS = ["elman", "lstm", "gru", "deep", "rmsnorm"]


@pytest.mark.parametrize("name", MODELS)
def test_gradient_equals_bptt(problems, name):
    """Float64, mask, initial states and L2: each plan (sqrt, binomial with
    recomputation, none kept, one step a segment, one segment) gives bptt's loss and
    gradients to rounding."""
    module, (params, x, targets, state0, mask) = problems(name)
    kw = dict(state0=state0, mask=mask, l2=0.01)
    loss, grads = module.loss_and_grads(params, x, targets, **kw)
    for plan in PLANS:
        l, g = module.loss_and_grads(params, x, targets, algorithm="checkpoint", **kw, **plan)
        assert abs(l - loss) <= 1e-12 * abs(loss), plan
        for p in grads:
            assert max_relative_error(g[p], grads[p]) < 1e-12, (plan, p)


class Slices:
    """An array read only by slices (as a sequence too long to hold would be)."""

    def __init__(self, a):
        self.a, self.shape, self.reads = a, a.shape, 0

    def __getitem__(self, index):
        assert isinstance(index, slice)
        self.reads += 1
        return self.a[index]


def test_reads_the_sequence_by_slices(problems, tmp_path):
    module, (params, x, targets, state0, mask) = problems("lstm", T=9)
    loss, grads = module.loss_and_grads(params, x, targets, mask=mask)
    path = tmp_path / "x.npy"
    np.save(path, x)
    for xs in (np.load(path, mmap_mode="r"), Slices(x)):
        ts, ms = Slices(targets), Slices(mask)
        l, g = module.loss_and_grads(params, xs, ts, mask=ms, algorithm="checkpoint",
                                     segment=4)
        assert ts.reads >= 3 and ms.reads >= 3
        assert abs(l - loss) <= 1e-12 * loss
        assert all(max_relative_error(g[p], grads[p]) < 1e-12 for p in grads)
    bad = x.copy()
    bad[8, 1, 0] = np.nan
    with pytest.raises(ValueError, match="x contains NaN"):
        module.loss_and_grads(params, Slices(bad), targets, algorithm="checkpoint", segment=4)


@pytest.mark.parametrize("name", MODELS)
def test_loss_within_a_memory_limit_runs_in_stretches(problems, name):
    """loss(memory_limit=...) where the whole call does not fit: stretches of the steps
    that do, each from the last one's states; the loss of the whole call to rounding
    (float64, mask, initial states, L2), read by slices, each stretch checked."""
    module, (params, x, targets, state0, mask) = problems(name, T=9)
    kw = dict(state0=state0, l2=0.01)
    whole = module.loss(params, x, targets, mask=mask, threads=1, **kw)
    fits = module.loss(params, Slices(x), Slices(targets), mask=Slices(mask),
                       memory_limit=1e12, **kw)  # one stretch: the whole sequence
    assert abs(fits - whole) <= 1e-15 * abs(whole)
    sizes = calls.check_call(module.SPEC, params, x, targets)[0]
    one, two = (module._MODEL._call_bytes(sizes, t, 3, 8) for t in (1, 2))
    for steps in (1, 2, 4):  # stretches of this many steps fit
        limit = one + (steps - 1) * (two - one)
        assert module._MODEL._steps_within(sizes, 9, 3, np.float64, limit) == steps
        ts, ms = Slices(targets), Slices(mask)
        got = module.loss(params, Slices(x), ts, mask=ms, memory_limit=limit, **kw)
        assert abs(got - whole) <= 1e-12 * abs(whole), steps
        assert ts.reads >= -(-9 // steps)
    bad = x.copy()
    bad[8, 1, 0] = np.nan
    with pytest.raises(ValueError, match="x contains NaN"):
        module.loss(params, Slices(bad), targets, memory_limit=one)
    with pytest.raises(ValueError, match="for a single step, more than memory_limit"):
        module.loss(params, x, targets, memory_limit=one - 1)


def test_loss_of_a_reverse_state_needs_the_whole_sequence(problems):
    module, (params, x, targets, _, _) = problems("bielman", T=6)
    module.loss(params, x, targets, memory_limit=1e12)  # fits: no stretches
    sizes = calls.check_call(module.SPEC, params, x, targets)[0]
    two_steps = module._MODEL._call_bytes(sizes, 2, 3, 8)
    with pytest.raises(ValueError, match="needs the whole sequence at once.*2 of 6 steps"):
        module.loss(params, x, targets, memory_limit=two_steps)


def traced_peak(call):
    """Bytes NumPy allocates at most during call() (tracemalloc sees NumPy's buffers)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        call()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("algorithm, plan", [("bptt", {}), ("tbptt", dict(k1=50, k2=100)),
                                             ("checkpoint", {}),
                                             ("checkpoint", dict(segment=8, snapshots=3))])
def test_memory_announced_is_what_a_call_allocates(problems, algorithm, plan):
    """memory() before the call against the peak the call allocates: within 15% and
    never exceeded by more; checkpointed calls hold far less than bptt's."""
    module, _ = problems("lstm")
    sizes, T, B = dict(I=16, H=32, O=8), 400, 4
    params = module.init_params(sizes, dtype=np.float64)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(T, B, 16))
    targets = rng.integers(0, 8, (T, B))
    # compile first: Numba's allocations while compiling would count
    module.loss_and_grads(params, x[:12], targets[:12], algorithm=algorithm, **plan)
    announced = module.memory(sizes, T, B, np.float64, algorithm,
                              **{k: v for k, v in plan.items() if k not in ("k1", "k2")})
    module.free_workspace()
    used = traced_peak(lambda: module.loss_and_grads(params, x, targets, algorithm=algorithm,
                                                     **plan))
    module.free_workspace()
    assert 0.85 * announced <= used <= 1.15 * announced, (announced, used)
    if algorithm == "checkpoint":
        assert announced < module.memory(sizes, T, B, np.float64) / 4


def test_memory_limit_refuses_with_the_plan_that_fits(problems):
    module, (params, x, targets, state0, mask) = problems("gru", T=40, B=2)
    sizes = dict(zip(module.SIZES, (params["W_y"].shape[1], params["W_y"].shape[1],
                                    params["W_y"].shape[0])))
    need = module.memory({s: n for s, n in zip(module.SIZES, (3, 4, 3))}, 40, 2, np.float64)
    limit = need // 3
    with pytest.raises(ValueError, match=r"algorithm='bptt' on gru .* needs about .* "
                                         r"algorithm='checkpoint' computes the same"):
        module.loss_and_grads(params, x, targets, memory_limit=limit)
    loss, grads = module.loss_and_grads(params, x, targets)
    l, g = module.loss_and_grads(params, x, targets, algorithm="checkpoint",
                                 memory_limit=limit)
    assert abs(l - loss) <= 1e-12 * loss
    assert all(max_relative_error(g[p], grads[p]) < 1e-12 for p in grads)
    with pytest.raises(ValueError, match="no checkpointed schedule fits"):
        module.loss_and_grads(params, x, targets, algorithm="checkpoint", memory_limit=100)
    del sizes


@pytest.mark.parametrize("kw, match", [
    (dict(snapshots=-1), "snapshots must be an integer >= 0"),
    (dict(segment=0), "segment must be an integer >= 1"),
    (dict(memory_limit=0), "memory_limit must be a positive number"),
])
def test_refuses_bad_options(problems, kw, match):
    module, (params, x, targets, state0, mask) = problems("elman")
    with pytest.raises(ValueError, match=match):
        module.loss_and_grads(params, x, targets, algorithm="checkpoint", **kw)


def test_trainer_trains_with_checkpoints(problems):
    """A Trainer with algorithm='checkpoint' takes bptt's steps exactly."""
    module, (params, x, targets, state0, mask) = problems("elman", T=12)
    sizes = {s: n for s, n in zip(module.SIZES, (3, 4, 3))}
    runs = []
    for kw in (dict(), dict(algorithm="checkpoint", segment=5, snapshots=1)):
        trainer = module.Trainer(sizes, dtype=np.float64, lr=0.1, **kw)
        trainer.fit(x, targets, epochs=2, batch_size=2, progress=False)
        runs.append(trainer.params)
    assert all(max_relative_error(runs[0][p], runs[1][p]) < 1e-12 for p in runs[0])


def test_a_trainers_held_out_loss_keeps_to_its_memory_limit(problems):
    """A Trainer whose memory_limit makes it checkpoint evaluates held-out data in
    stretches within the same limit: the loss of the whole sequence to rounding."""
    module, (params, x, targets, state0, mask) = problems("lstm", T=12)
    sizes = calls.check_call(module.SPEC, params, x, targets)[0]
    limit = module._MODEL._call_bytes(sizes, 5, 3, 8)  # 5 of the 12 steps fit
    trainer = module.Trainer(sizes, dtype=np.float64, lr=0.1, algorithm="checkpoint",
                             memory_limit=limit)
    trainer.fit(x, targets, epochs=1, batch_size=3, progress=False, validation=(x, targets))
    want = module.loss(trainer.params, x, targets)  # no limit: one call
    assert abs(trainer.history["val_loss"][0] - want) <= 1e-12 * want
    with pytest.raises(ValueError, match="more than memory_limit"):
        module.loss_and_grads(trainer.params, x, targets, memory_limit=limit)


def test_readme_long_sequence_example(capsys):
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        block, = re.findall(r"<!-- readme-test: long-sequences -->\n```python\n(.*?)```",
                            f.read(), re.S)
    exec(compile(block, "README.md", "exec"), {})
    full, error = capsys.readouterr().out.splitlines()
    assert float(re.search(r"takes (\S+) MiB", full).group(1)) > 2  # more than the limit
    assert float(error) < 1e-12
