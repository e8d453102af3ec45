"""Bad input gets a clear error, and nothing is lost.

* every malformed call of a generated module raises ValueError/TypeError naming
  the argument, the expected and the actual value, from runtime's checks, before
  any kernel runs;
* a definition file with an error is reported with its file, line and symbol;
* ``generate`` never overwrites a hand-made or edited file without --force;
* a diverging run stops, says where and keeps the last good parameters;
* checkpoints are atomic, and a resumed run ends where an uninterrupted one does.
"""

import importlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from bpttgen.codegen.app import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def elman():
    return importlib.import_module("bpttgen.generated.elman")


@pytest.fixture(scope="module")
def lstm():
    return importlib.import_module("bpttgen.generated.lstm")


def problem(module, T=4, B=2, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    sizes = {"I": 3, "H": 4, "O": 5}
    params = module.init_params(sizes, seed=seed, dtype=dtype)
    x = rng.normal(0, 1, (T, B, 3)).astype(dtype)
    targets = rng.integers(0, 5, (T, B))
    state0 = {s: rng.normal(0, 0.5, (B, 4)).astype(dtype) for s in module.STATES}
    return dict(params=params, x=x, targets=targets, state0=state0)


def call(module, p, **kw):
    args = dict(p)
    args.update(kw)
    return module.loss_and_grads(args.pop("params"), args.pop("x"), args.pop("targets"),
                                 **args)


def raised_in_checks(excinfo):
    """The error comes from codegen/runtime/calls.py or online.py (their checks), not from a
    kernel."""
    return os.path.basename(str(excinfo.traceback[-1].path)) in ("calls.py", "online.py")


# -- malformed calls -------------------------------------------------------------------
def _params(p, name, value):
    return dict(p["params"], **{name: value})


def _drop(d, key):
    return {k: v for k, v in d.items() if k != key}


BAD_CALLS = {
    # id: (change to the good call, exception, regex the message must match)
    "params-not-dict": (lambda p: dict(params=list(p["params"].values())), TypeError,
                        r"params must be a dict of arrays, got list"),
    "params-missing": (lambda p: dict(params=_drop(p["params"], "W_hh")), ValueError,
                       r"params is missing \['W_hh'\]; expected keys"),
    "params-unknown": (lambda p: dict(params=_params(p, "W_extra", np.zeros(2))),
                       ValueError, r"params has unknown keys \['W_extra'\]"),
    "param-not-array": (lambda p: dict(params=_params(p, "W_hh", [[0.0] * 4] * 4)),
                        TypeError, r"params\['W_hh'\] must be a numpy array, got list"),
    "param-int-dtype": (lambda p: dict(params={k: v.astype(np.int64) for k, v in
                                               p["params"].items()}),
                        TypeError, r"params must be float32 or float64 arrays, got dtype "
                                   r"int64"),
    "param-mixed-dtype": (lambda p: dict(params=_params(p, "b_h", p["params"]["b_h"]
                                                        .astype(np.float32))),
                          TypeError, r"params\['b_h'\] has dtype float32, expected float64"),
    "param-ndim": (lambda p: dict(params=_params(p, "b_h", np.zeros((4, 1)))), ValueError,
                   r"params\['b_h'\] has shape \(4, 1\), expected 1 dimensions \('H',\)"),
    "param-size": (lambda p: dict(params=_params(p, "W_hh", np.zeros((4, 5)))), ValueError,
                   r"params\['W_hh'\] has shape \(4, 5\) but H = 4"),
    "param-nan": (lambda p: dict(params=_params(p, "W_xh", np.full((4, 3), np.nan))),
                  ValueError, r"params\['W_xh'\] contains NaN or Inf"),
    "param-empty": (lambda p: dict(params={k: np.zeros((0,) * v.ndim) for k, v in
                                           p["params"].items()}),
                    ValueError, r"must be at least 1"),
    "x-list": (lambda p: dict(x=p["x"].tolist()), TypeError,
               r"x must be a numpy array of shape \(T, B, I\), got list"),
    "x-2d": (lambda p: dict(x=p["x"][0]), ValueError,
             r"x must have shape \(T, B, I\) \(time-major\), got \(2, 3\)"),
    "x-dtype": (lambda p: dict(x=p["x"].astype(np.float32)), TypeError,
                r"x has dtype float32, expected float64"),
    "x-int": (lambda p: dict(x=p["x"].astype(np.int32)), TypeError,
              r"x has dtype int32, expected float64"),
    "x-size": (lambda p: dict(x=np.zeros((4, 2, 7))), ValueError,
               r"x has shape \(4, 2, 7\), expected \(T, B, I=3\)"),
    "x-empty": (lambda p: dict(x=np.zeros((0, 2, 3)), targets=np.zeros((0, 2), int)),
                ValueError, r"T and B must be at least 1"),
    "x-inf": (lambda p: dict(x=np.where(np.arange(3) == 1, np.inf, p["x"])), ValueError,
              r"x contains NaN or Inf \(first at index \(0, 0, 1\), value inf\)"),
    "targets-shape": (lambda p: dict(targets=p["targets"][:3]), ValueError,
                      r"targets must have shape \(T, B\) = \(4, 2\) of class indices, "
                      r"got \(3, 2\)"),
    "targets-float": (lambda p: dict(targets=p["targets"].astype(np.float64)), TypeError,
                      r"targets must be integer class indices, got dtype float64"),
    "targets-too-big": (lambda p: dict(targets=np.where(np.arange(2) == 1, 5,
                                                        p["targets"])),
                        ValueError, r"targets contains class 5 at \(t, b\) = \(0, 1\), "
                                    r"outside \[0, 5\) \(O = 5 output units\)"),
    "targets-negative": (lambda p: dict(targets=-np.ones((4, 2), int)), ValueError,
                         r"targets contains class -1 .* outside \[0, 5\)"),
    "targets-list": (lambda p: dict(targets=p["targets"].tolist()), TypeError,
                     r"targets must be a numpy array, got list"),
    "state0-not-dict": (lambda p: dict(state0=p["state0"]["h"]), TypeError,
                        r"state0 must be a dict \{state: \(B, size\) array\} with keys "
                        r"\['h'"),
    "state0-shape": (lambda p: dict(state0={k: v[:1] for k, v in p["state0"].items()}),
                     ValueError, r"state0\['h'\] must have shape \(B, H\) = \(2, 4\), got "
                                 r"\(1, 4\)"),
    "state0-dtype": (lambda p: dict(state0={k: v.astype(np.float32) for k, v in
                                            p["state0"].items()}),
                     TypeError, r"state0\['h'\] has dtype float32, expected float64"),
    "state0-list": (lambda p: dict(state0={k: v.tolist() for k, v in p["state0"].items()}),
                    TypeError, r"state0\['h'\] must be a numpy array of shape"),
    "state0-nan": (lambda p: dict(state0={k: v * np.nan for k, v in p["state0"].items()}),
                   ValueError, r"state0\['h'\] contains NaN or Inf"),
    "state0-unknown": (lambda p: dict(state0=dict(p["state0"], q=np.zeros((2, 4)))),
                       ValueError, r"state0 has unknown states \['q'\]"),
    "mask-shape": (lambda p: dict(mask=np.ones((4, 3))), ValueError,
                   r"mask must have shape \(T, B\) = \(4, 2\), got \(4, 3\)"),
    "mask-negative": (lambda p: dict(mask=-np.ones((4, 2))), ValueError,
                      r"mask must be non-negative, got minimum -1"),
    "mask-nan": (lambda p: dict(mask=np.full((4, 2), np.nan)), ValueError,
                 r"mask contains NaN or Inf"),
    "mask-object": (lambda p: dict(mask=np.full((4, 2), None)), TypeError,
                    r"mask must hold numbers \(float, int or bool\), got dtype object"),
    "mask-zero": (lambda p: dict(mask=np.zeros((4, 2))), ValueError,
                  r"mask selects no loss term"),
    "algorithm": (lambda p: dict(algorithm="magic"), ValueError,
                  r"unknown algorithm 'magic'; choose one of"),
    "tbptt-no-k": (lambda p: dict(algorithm="tbptt"), ValueError,
                   r"algorithm='tbptt' needs k1 and k2"),
    "tbptt-k2-small": (lambda p: dict(algorithm="tbptt", k1=3, k2=2), ValueError,
                       r"tbptt needs 1 <= k1 <= k2, got k1=3, k2=2"),
    "tbptt-k-float": (lambda p: dict(algorithm="tbptt", k1=1.5, k2=2), TypeError,
                      r"k1 and k2 must be integers, got 1.5 and 2"),
    "k-without-tbptt": (lambda p: dict(k1=2, k2=2), ValueError,
                        r"k1/k2 apply to algorithm='tbptt', not 'bptt'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_call_is_refused_before_any_kernel(elman, case):
    change, kind, message = BAD_CALLS[case]
    p = problem(elman)
    with pytest.raises(kind, match=message) as excinfo:
        call(elman, p, **change(p))
    assert raised_in_checks(excinfo), excinfo.traceback[-1]


def test_missing_state_is_named(lstm):
    p = problem(lstm)
    with pytest.raises(ValueError, match=r"state0 is missing the state 'c' \(expected keys "
                                         r"\['h', 'c'\]; leave state0 out"):
        call(lstm, p, state0={"h": p["state0"]["h"]})
    with pytest.raises(ValueError, match=r"state0 is missing the state 'c'"):
        lstm.forward(p["params"], p["x"], state0={"h": p["state0"]["h"]})


def test_forward_checks_too(elman):
    p = problem(elman)
    with pytest.raises(ValueError, match=r"x has shape \(4, 2, 2\), expected \(T, B, I=3\)"):
        elman.forward(p["params"], p["x"][:, :, :2])


def test_vector_targets_are_checked(generated_module):
    mse = generated_module("elman-mse")
    p = problem(mse)
    p["targets"] = np.zeros((4, 2, 5))
    call(mse, p)  # the good call works
    for targets, kind, message in [
            (np.zeros((4, 2)), ValueError, r"targets must have shape \(T, B, O\) = "
                                           r"\(4, 2, 5\), got \(4, 2\)"),
            (np.zeros((4, 2, 5), np.float32), TypeError, r"targets has dtype float32, "
                                                         r"expected float64"),
            (np.full((4, 2, 5), np.nan), ValueError, r"targets contains NaN or Inf")]:
        with pytest.raises(kind, match=message):
            call(mse, p, targets=targets)


def test_non_contiguous_inputs_give_the_same_result(elman):
    """Views with other strides are copied, never misread by a kernel."""
    # The copying is the driver's, the same for every module: the cheapest one does.
    p = problem(elman, T=5, B=3)
    loss, grads = call(elman, p)
    x_f = np.asfortranarray(p["x"])
    x_view = np.concatenate([p["x"], p["x"]], axis=2)[:, :, ::2][:, :, :3]
    x_view[...] = p["x"]
    params_f = {k: np.asfortranarray(v) if v.ndim == 2 else v for k, v in p["params"].items()}
    targets_t = np.ascontiguousarray(p["targets"].T).T
    state_v = {k: np.repeat(v, 2, axis=1)[:, ::2] for k, v in p["state0"].items()}
    assert not x_f.flags.c_contiguous and not targets_t.flags.c_contiguous
    loss2, grads2 = elman.loss_and_grads(params_f, x_view, targets_t, state0=state_v)
    assert loss2 == loss
    for k in grads:
        np.testing.assert_array_equal(grads2[k], grads[k])
    y, _ = elman.forward(p["params"], x_f)
    np.testing.assert_array_equal(y, elman.forward(p["params"], p["x"])[0])


def test_inputs_are_not_changed_by_a_refused_call(elman):
    p = problem(elman)
    before = {k: v.copy() for k, v in p["params"].items()}
    with pytest.raises(ValueError):
        call(elman, p, targets=np.full((4, 2), 9))
    for k in before:
        np.testing.assert_array_equal(p["params"][k], before[k])


# -- the Trainer's arguments -----------------------------------------------------------
@pytest.mark.parametrize("kwargs,kind,message", [
    (dict(optimizer="rmsprop"), ValueError, r"optimizer must be one of \('sgd', "),
    (dict(algorithm="magic"), ValueError, r"algorithm must be one of"),
    (dict(lr=-1.0), ValueError, r"lr must be a positive finite number, got -1.0"),
    (dict(lr=float("nan")), ValueError, r"lr must be a positive finite number"),
    (dict(l2=-0.1), ValueError, r"l2 must be a non-negative finite number"),
    (dict(clip=0), ValueError, r"clip must be a positive number or None, got 0"),
    (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\)"),
    (dict(algorithm="tbptt"), ValueError, r"needs k1 and k2"),
    (dict(k1=2, k2=2), ValueError, r"k1/k2 apply to algorithm='tbptt', not 'bptt'"),
])
def test_trainer_arguments(elman, kwargs, kind, message):
    with pytest.raises(kind, match=message):
        elman.Trainer({"I": 3, "H": 4, "O": 5}, **kwargs)


@pytest.mark.parametrize("sizes,kind,message", [
    ({"I": 3, "H": 4}, ValueError, r"sizes must name exactly \('I', 'H', 'O'\); missing "
                                   r"\['O'\]"),
    ({"I": 3, "H": 4, "O": 5, "X": 1}, ValueError, r"unknown \['X'\]"),
    ({"I": 3, "H": 0, "O": 5}, ValueError, r"size H must be a positive integer, got 0"),
    ((3, 4), ValueError, r"sizes must give 3 values for \('I', 'H', 'O'\), got \(3, 4\)"),
    ("3,4,5", TypeError, r"sizes must be a dict"),
])
def test_trainer_sizes(elman, sizes, kind, message):
    with pytest.raises(kind, match=message):
        elman.Trainer(sizes)


def test_fit_checks_the_data(elman):
    tr = elman.Trainer({"I": 3, "H": 4, "O": 5})
    x = np.zeros((4, 6, 3), np.float32)
    with pytest.raises(ValueError, match=r"targets must start with x's \(T, N\) = \(4, 6\), "
                                         r"got shape \(4, 5\)"):
        tr.fit(x, np.zeros((4, 5), int), progress=False)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0"):
        tr.fit(x, np.zeros((4, 6), int), batch_size=0, progress=False)
    with pytest.raises(ValueError, match=r"mask must have shape \(T, N\) = \(4, 6\)"):
        tr.fit(x, np.zeros((4, 6), int), mask=np.ones((4, 5)), progress=False)


# -- definition files ------------------------------------------------------------------
GOOD_PREFIX = """\
from bpttgen.derive import Model, tanh, softmax_cross_entropy


def model():
    m = Model("broken", sizes=("I", "H", "O"))
    x = m.input("x", "I")
    h = m.state("h", "H")
"""

BAD_DEFINITIONS = {
    # id: (the lines after GOOD_PREFIX, line of the error (1-based), message regex)
    "product-shape": ("""\
    W = m.matrix("W_hh", "H", "H")
    m.update(h, tanh(W @ x))
""", 9, r"shape mismatch in 'W_hh @ x': W_hh has shape \(H, H\) but 'x' has size I"),
    "unknown-size": ("""\
    W = m.matrix("W_xh", "H", "K")
""", 8, r"'W_xh' has size 'K', which is not one of the model's sizes"),
    "sum-shape": ("""\
    W = m.matrix("W_xh", "H", "I")
    m.update(h, tanh(W @ x + x))
""", 9, r"shape mismatch in 'W_xh_x \+ x': sizes H and I differ"),
    "state-before-update": ("""\
    m.output(m.matrix("W_hy", "O", "H") @ h, loss=softmax_cross_entropy)
""", 8, r"state 'h' used before m.update\(h, ...\)"),
    "twice": ("""\
    b = m.bias("b", "H")
    b = m.bias("b", "H")
""", 9, r"name 'b' is already defined"),
    "unknown-loss": ("""\
    m.update(h, tanh(h.prev))
    m.output(m.matrix("W_hy", "O", "H") @ h, loss="hinge")
""", 9, r"unknown loss 'hinge'"),
    "syntax": ("""\
    m.update(h, tanh(h.prev)
""", 8, r"syntax error"),
}


@pytest.mark.parametrize("case", sorted(BAD_DEFINITIONS))
@pytest.mark.parametrize("command", ["generate", "check"])
def test_definition_error_names_file_line_and_symbol(tmp_path, capsys, case, command):
    body, line, message = BAD_DEFINITIONS[case]
    path = tmp_path / "cell.py"
    path.write_text(GOOD_PREFIX + body)
    out = tmp_path / "out"
    argv = [command, str(path)] + (["-o", str(out)] if command == "generate" else [])
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{path}:" in err, err
    assert re.search(message, err), err
    found = int(re.search(re.escape(str(path)) + r":(\d+)", err).group(1))
    assert found in (line, line + 1) if case == "syntax" else found == line, err
    assert not out.exists() or not list(out.iterdir()), "nothing may be written"
    assert "Traceback" not in err


def test_definition_without_model(tmp_path, capsys):
    path = tmp_path / "empty.py"
    path.write_text("x = 1\n")
    assert cli.main(["generate", str(path), "-o", str(tmp_path)]) == cli.EXIT_USAGE
    assert f"{path}:1: {path} must define model() returning a bpttgen.Model" in \
        capsys.readouterr().err


def test_unknown_model_name(capsys):
    assert cli.main(["check", "elmann"]) == cli.EXIT_USAGE
    assert "unknown model 'elmann': not a built-in" in capsys.readouterr().err


# -- generate never destroys work ------------------------------------------------------
def test_generate_refuses_a_hand_written_file(tmp_path, capsys):
    target = tmp_path / "elman.py"
    target.write_text("# my own elman, not generated\n")
    assert cli.main(["generate", "elman", "-o", str(tmp_path), "-q"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"refusing to overwrite {target}: it has no bpttgen header or was edited" in err
    assert "--force" in err
    assert target.read_text() == "# my own elman, not generated\n"
    assert sorted(os.listdir(tmp_path)) == ["elman.py"]  # no temporary file left


def test_generate_refuses_an_edited_file_until_forced(tmp_path, capsys):
    assert cli.main(["generate", "elman", "-o", str(tmp_path), "-q"]) == 0
    target = tmp_path / "elman.py"
    generated = target.read_text()
    # Regenerating an unedited file is fine.
    assert cli.main(["generate", "elman", "-o", str(tmp_path), "-q"]) == 0
    edited = generated.replace('NAME = "elman"', 'NAME = "elman"  # tuned by hand')
    assert edited != generated
    target.write_text(edited)
    assert cli.main(["generate", "elman", "-o", str(tmp_path), "-q"]) == cli.EXIT_USAGE
    assert "refusing to overwrite" in capsys.readouterr().err
    assert target.read_text() == edited
    assert cli.main(["generate", "elman", "-o", str(tmp_path), "-q", "--force"]) == 0
    assert target.read_text() == generated


# -- divergence ------------------------------------------------------------------------
def _parity_data(T=6, N=16, seed=0):
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, (T, N))
    return bits[:, :, None].astype(np.float32), np.cumsum(bits, 0) % 2


def test_divergence_stops_and_keeps_the_last_good_parameters(elman, monkeypatch):
    x, y = _parity_data()
    tr = elman.Trainer({"I": 1, "H": 4, "O": 2}, optimizer="adam", lr=0.01)
    snapshots = []
    real = tr.loss_and_grads

    def flaky(*a, **kw):
        snapshots.append({k: v.copy() for k, v in tr.params.items()})
        loss, grads = real(*a, **kw)
        return (float("nan") if len(snapshots) == 4 else loss), grads

    monkeypatch.setattr(tr, "loss_and_grads", flaky)
    with pytest.warns(RuntimeWarning, match="training diverged"):
        history = tr.fit(x, y, epochs=5, batch_size=4, progress=False)
    # The 4th loss (parameters after update 3) was NaN: keep those after update 2.
    assert tr.diverged == ("training diverged: the update 4 got loss nan; kept the "
                           "parameters after update 2, the last that gave a finite loss "
                           "(lower lr or set clip)")
    assert tr.steps == 2
    for k in tr.params:
        np.testing.assert_array_equal(tr.params[k], snapshots[2][k])
    assert history["loss"] == []  # the first epoch never finished


def test_exploding_parameters_are_caught(elman):
    """An update that overflows float32 is undone at once."""
    x, y = _parity_data()
    tr = elman.Trainer({"I": 1, "H": 4, "O": 2}, optimizer="sgd", lr=1e39)
    start = {k: v.copy() for k, v in tr.params.items()}
    with pytest.warns(RuntimeWarning):
        tr.fit(x, y, epochs=2, progress=False)
    assert "the update 1 made" in tr.diverged and "non-finite" in tr.diverged
    assert tr.steps == 0
    for k in start:
        np.testing.assert_array_equal(tr.params[k], start[k])


def test_train_command_reports_divergence(tmp_path, capsys):
    out = tmp_path / "p.npz"
    rc = cli.main(["train", "elman", "--task", "parity", "--samples", "16", "--seq-len", "6",
                   "--hidden", "4", "--optimizer", "sgd", "--lr", "1e39", "-o", str(out),
                   "-q"])
    assert rc == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "training diverged: the update 1 made" in err and str(out) in err
    with np.load(out) as data:
        assert all(np.all(np.isfinite(data[k])) for k in ("W_xh", "W_hh", "W_hy"))


# -- checkpoints -----------------------------------------------------------------------
def test_save_is_atomic(elman, tmp_path, monkeypatch):
    tr = elman.Trainer({"I": 1, "H": 4, "O": 2})
    path = tmp_path / "ckpt.npz"
    tr.save(path)
    good = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    tr.params["W_hh"] += 1
    with pytest.raises(OSError, match="disk full"):
        tr.save(path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ckpt.npz"]  # the temporary file is gone


@pytest.mark.parametrize("algorithm,optimizer", [("bptt", "adam"), ("epochwise", "momentum"),
                                                 ("tbptt", "adam")])
def test_interrupted_and_resumed_fit_equals_uninterrupted(elman, tmp_path, algorithm,
                                                          optimizer):
    x, y = _parity_data(T=6, N=20)
    kw = dict(optimizer=optimizer, lr=0.05, algorithm=algorithm, clip=5.0)
    if algorithm == "tbptt":
        kw.update(k1=2, k2=3)
    sizes = {"I": 1, "H": 5, "O": 2}
    fit = dict(epochs=3, batch_size=6, progress=False)  # 4 minibatches an epoch
    full = elman.Trainer(sizes, **kw)
    full.fit(x, y, **fit)

    first = elman.Trainer(sizes, **kw)
    first.fit(x, y, callback=lambda tr, info: info["event"] == "batch" and
              (info["epoch"], info["batch"]) == (1, 1), **fit)
    assert first.position == (1, 2)
    first.save(tmp_path / "ckpt.npz")
    resumed = elman.Trainer(sizes, **kw).load(tmp_path / "ckpt.npz")
    history = resumed.fit(x, y, resume=True, **fit)
    assert resumed.steps == full.steps
    assert history["loss"] == pytest.approx(full.history["loss"], rel=1e-6)
    for k in full.params:
        np.testing.assert_allclose(resumed.params[k], full.params[k], rtol=1e-6, atol=1e-7)


TRAIN = ["train", "elman", "--task", "parity", "--samples", "40", "--seq-len", "6",
         "--hidden", "5", "--batch-size", "4", "--epochs", "3", "--lr", "0.05", "-q"]


INTERRUPTED = re.compile(r"interrupted at epoch (\d+), minibatch (\d+) \((\d+) updates\); "
                         r"checkpoint saved to (.+)\. Continue with the same command and "
                         r"--resume")


def interrupted_at(stderr):
    """(position, updates, checkpoint path) that an interrupted ``bpttgen train`` reports."""
    found = INTERRUPTED.search(stderr)
    assert found, stderr
    epoch, batch, updates, path = found.groups()
    return (int(epoch) - 1, int(batch)), int(updates), path


def assert_consistent_checkpoint(trainer, stderr, ckpt, batches):
    """What holds wherever an interrupt lands (bptt: one update per minibatch): the
    report on stderr names the checkpoint's position and step count, and these agree
    with each other and with the loss history. At an epoch's end the position is
    (epoch, batches) or (epoch + 1, 0), depending on whether the interrupt was seen
    before or after the epoch's bookkeeping; both mean the same number of updates."""
    assert interrupted_at(stderr) == (trainer.position, trainer.steps, str(ckpt))
    epoch, batch = trainer.position
    assert 0 <= batch <= batches
    assert trainer.steps == epoch * batches + batch
    assert len(trainer.history["loss"]) == epoch


#: Where the Ctrl-C of the in-process test lands, and the position it stops at.
#: TRAIN has 10 minibatches an epoch: update 7 is mid-epoch, update 10 the last of
#: epoch 1, and "epoch 1" is between its last minibatch and its end (the epoch
#: boundary, which the real Ctrl-C of the subprocess test hits only by chance).
CTRL_C_AT = {"update-7": (("update", 7), (0, 7)), "update-10": (("update", 10), (0, 10)),
             "epoch-end": (("epoch", 0), (1, 0))}


@pytest.mark.parametrize("case", sorted(CTRL_C_AT))
def test_ctrl_c_checkpoints_and_resume_finishes_the_run(elman, tmp_path, monkeypatch,
                                                        capsys, case):
    (event, at), position = CTRL_C_AT[case]
    out, ckpt = tmp_path / "p.npz", tmp_path / "p.ckpt.npz"
    assert cli.main(TRAIN + ["-o", str(tmp_path / "full.npz")]) == 0
    real_loss_and_grads, real_fit = elman.loss_and_grads, elman.Trainer.fit
    calls = []

    def ctrl_c_during_an_update(*a, **kw):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGINT)  # handled: stop after this minibatch
        return real_loss_and_grads(*a, **kw)

    def ctrl_c_at_an_epoch_end(self, *a, callback=None, **kw):
        def before_the_cli_callback(tr, info):
            if info["event"] == "epoch" and info["epoch"] == at:
                os.kill(os.getpid(), signal.SIGINT)
            return callback(tr, info)

        return real_fit(self, *a, callback=before_the_cli_callback, **kw)

    if event == "update":
        monkeypatch.setattr(elman, "loss_and_grads", ctrl_c_during_an_update)
    else:
        monkeypatch.setattr(elman.Trainer, "fit", ctrl_c_at_an_epoch_end)
    assert cli.main(TRAIN + ["-o", str(out)]) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert ckpt.exists() and not out.exists()
    saved = elman.Trainer({"I": 1, "H": 5, "O": 2}).load(ckpt)
    assert saved.position == position
    assert_consistent_checkpoint(saved, err, ckpt, batches=10)
    monkeypatch.undo()
    assert cli.main(TRAIN + ["-o", str(out), "--resume"]) == 0
    assert not ckpt.exists()  # finished: the output holds the final state
    with np.load(out) as a, np.load(tmp_path / "full.npz") as b:
        assert int(a["__steps__"]) == int(b["__steps__"]) == 30
        for k in ("W_xh", "W_hh", "b_h", "W_hy", "b_y"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_a_crash_loses_at_most_n_steps(elman, tmp_path, monkeypatch):
    calls = []
    real = elman.loss_and_grads

    def crash_at_step_12(*a, **kw):
        calls.append(1)
        if len(calls) == 12:
            raise MemoryError("the machine ran out of memory")
        return real(*a, **kw)

    monkeypatch.setattr(elman, "loss_and_grads", crash_at_step_12)
    with pytest.raises(MemoryError):
        cli.main(TRAIN + ["-o", str(tmp_path / "p.npz"), "--checkpoint-every", "5"])
    tr = elman.Trainer({"I": 1, "H": 5, "O": 2}).load(tmp_path / "p.ckpt.npz")
    assert tr.steps == 10  # 11 steps done, checkpoints at 5 and 10: lost 1 <= 5


def test_resume_refuses_other_data_options(tmp_path, capsys):
    ckpt = tmp_path / "c.npz"
    assert cli.main(TRAIN + ["--epochs", "1", "--checkpoint", str(ckpt),
                             "--checkpoint-every", "1", "-o", str(ckpt)]) == 0
    assert cli.main(TRAIN + ["--checkpoint", str(ckpt), "--seq-len", "7", "--resume",
                             "-o", str(tmp_path / "x.npz")]) == cli.EXIT_USAGE
    assert f"--resume: {ckpt} was made with seq_len = 6, this run has 7" in \
        capsys.readouterr().err
    assert cli.main(TRAIN + ["--checkpoint", str(tmp_path / "none.npz"), "--resume"]) == \
        cli.EXIT_USAGE
    assert "--resume: no checkpoint at" in capsys.readouterr().err


def test_load_refuses_another_model(elman, lstm, tmp_path):
    lstm.Trainer({"I": 1, "H": 5, "O": 2}).save(tmp_path / "lstm.npz")
    tr = elman.Trainer({"I": 1, "H": 5, "O": 2})
    before = {k: v.copy() for k, v in tr.params.items()}
    with pytest.raises(ValueError, match="holds parameters of model 'lstm', not 'elman'"):
        tr.load(tmp_path / "lstm.npz")
    elman.Trainer({"I": 1, "H": 6, "O": 2}).save(tmp_path / "big.npz")
    with pytest.raises(ValueError, match=r"W_xh has shape \(6, 1\), expected \(5, 1\)"):
        tr.load(tmp_path / "big.npz")
    for k in before:
        np.testing.assert_array_equal(tr.params[k], before[k])


#: Seconds that only bound a hang of the subprocess test: nothing asserts how fast
#: anything runs (a loaded machine may take minutes to start Python and Numba).
HANG_BOUND = 600

#: The subprocess test's run: float64, so that the resumed and the uninterrupted
#: run are compared to 1e-12; 64 samples in minibatches of 4: 16 an epoch.
REAL_RUN = ["train", "elman", "--task", "parity", "--samples", "64", "--seq-len", "8",
            "--hidden", "4", "--batch-size", "4", "--dtype", "float64",
            "--checkpoint-every", "20"]


def test_real_ctrl_c_in_a_subprocess(tmp_path, capsys):
    """The real thing: SIGINT to a running ``bpttgen train``. When it lands is up to
    the scheduler (mid-epoch, on the last minibatch of an epoch or between epochs),
    so the test asserts what holds at any point: the report and the checkpoint agree,
    and resuming from the checkpoint ends where an uninterrupted run of the same
    length does."""
    out, ckpt, full = tmp_path / "p.npz", tmp_path / "p.ckpt.npz", tmp_path / "full.npz"
    cmd = [sys.executable, "-m", "bpttgen.codegen.app.cli", *REAL_RUN, "--epochs", "100000",
           "-o", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + HANG_BOUND
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not ckpt.exists():
            proc.kill()
            stdout, stderr = proc.communicate(timeout=HANG_BOUND)
            pytest.fail(f"no checkpoint within {HANG_BOUND} s (exit status "
                        f"{proc.returncode}):\n{stdout}\n{stderr}")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=HANG_BOUND)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == cli.EXIT_INTERRUPTED, stderr
    assert not out.exists()
    elman = importlib.import_module("bpttgen.generated.elman")
    saved = elman.Trainer({"I": 1, "H": 4, "O": 2}, dtype=np.float64).load(ckpt)
    assert saved.steps >= 20  # the first checkpoint existed before the Ctrl-C
    assert_consistent_checkpoint(saved, stderr, ckpt, batches=16)
    # stdout: the header, then one line per finished epoch, as in the history.
    assert textwrap.dedent(stdout).startswith("training elman on parity")
    epochs = re.findall(r"^epoch (\d+)/100000  loss (\d+\.\d{4})", stdout, re.M)
    assert epochs == [(str(i + 1), f"{loss:.4f}")
                      for i, loss in enumerate(saved.history["loss"])], stdout
    # Resumed to the end of the next epoch, it ends as an uninterrupted run does.
    length = ["--epochs", str(saved.position[0] + 1), "-q"]
    assert cli.main(REAL_RUN + length + ["-o", str(out), "--resume"]) == 0
    assert not ckpt.exists()
    assert cli.main(REAL_RUN + length + ["-o", str(full)]) == 0
    capsys.readouterr()
    resumed = elman.Trainer({"I": 1, "H": 4, "O": 2}, dtype=np.float64).load(out)
    uninterrupted = elman.Trainer({"I": 1, "H": 4, "O": 2}, dtype=np.float64).load(full)
    assert resumed.steps == uninterrupted.steps == (saved.position[0] + 1) * 16
    assert resumed.position == uninterrupted.position
    np.testing.assert_allclose(resumed.history["loss"], uninterrupted.history["loss"],
                               rtol=1e-12, atol=0)
    with np.load(out) as a, np.load(full) as b:
        for k in uninterrupted.params:
            assert a[k].dtype == b[k].dtype == np.float64, k
            np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-12, err_msg=k)
