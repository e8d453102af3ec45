"""Smoke tests of the benchmark and experiment scripts (bench/, experiments/).

They run on tiny sizes and on a text made here, never on shared/data. The
framework comparison needs the optional `bench` extra (torch, jax) and is skipped
without it.
"""

import importlib.util
import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(folder, name):
    """Import bench/<name>.py or experiments/<name>.py by path (they are scripts,
    not packages); bench/ also goes on sys.path for scaling.py's import."""
    if name in sys.modules:
        return sys.modules[name]
    if folder == "bench" and os.path.join(ROOT, "bench") not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, "bench"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, folder, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def text_file(tmp_path):
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "\n"]
    path = tmp_path / "tiny.txt"
    path.write_text(" ".join(rng.choice(words, 3000)), encoding="utf-8")
    return str(path)


def test_charlm_naive_equals_accumulated(text_file):
    charlm = _script("experiments", "charlm")

    rows = charlm.main([text_file, "--quick", "--runs", "naive,bptt,tbptt,embed", "--out", ""])
    naive, accumulated = [r for r in rows if "chars" in r["model"]]
    assert (naive["bptt"], accumulated["bptt"]) == ("naive (old)", "accumulated")
    # Same gradients (up to float32 rounding), same training: the printed digits agree.
    assert f"{naive['ppl']:.3f}" == f"{accumulated['ppl']:.3f}"
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in rows)
    assert any(r["bptt"].startswith("truncated") for r in rows)
    assert rows[-1]["model"] == "LSTM, embedding D = 8"  # the characters as tokens


def test_ab_compares_a_revision_with_the_working_tree():
    ab = _script("bench", "ab")

    rows = ab.main(["HEAD", "--models", "elman", "--quick", "--repeats", "1"])
    (row,) = rows
    assert row["model"] == "elman" and row["old"] > 0 and row["new"] > 0
    assert row["diff"] < 1e-5  # HEAD's module and this tree's: the same gradients


def test_ab_env_times_two_settings_in_two_processes():
    ab_env = _script("bench", "ab_env")

    rows = ab_env.main(["BPTTGEN_AB_SIDE=a", "BPTTGEN_AB_SIDE=b", "--models", "elman",
                        "--sizes", "2,5,3,4,3", "--rounds", "2", "--seconds", "0"])
    (row,) = rows
    assert row["size"] == (2, 5, 3, 4, 3) and row["a"] > 0 and row["b"] > 0
    assert row["diff"] == 0.0  # the same module, two processes: the same gradients


def test_adding_bounds_and_smoke():
    adding = _script("experiments", "adding")

    majority, second_only = adding.bounds(5, n=100_000)
    # The sum of two U(0,1) in 5 bins: the middle bin holds 36%; knowing one value helps
    # only a little, so a model above ~0.7 must have used both.
    assert abs(majority - 0.36) < 0.01
    assert majority < second_only < 0.5
    rows = adding.main(["--quick", "--models", "elman", "--out", ""])
    assert [r["bptt"] for r in rows] == ["full", "truncated(2,4)"]
    assert all(0 <= r["acc"] <= 1 for r in rows)


@pytest.mark.parametrize("model", ["elman", "lstm", "gru"])
def test_frameworks_gradients_agree(model):
    """bpttgen, PyTorch (cell and torch.nn) and JAX give the same loss and
    gradients: the parameter mapping of bench/frameworks.py is right."""
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    import importlib

    fw = _script("bench", "frameworks")

    module = importlib.import_module(f"bpttgen.generated.{model}")
    assert fw.check_float64(np, torch, module, model) < fw.TOLERANCE_F64
    params, x, targets = fw.problem(np, module, model, 3, 6, 5, 7, 4, np.float32)
    loss_ref, g_ref = module.loss_and_grads(params, x, targets)
    runners = [fw.torch_runner(torch, np, model, "cell", params, x, targets),
               fw.torch_runner(torch, np, model, "nn", params, x, targets),
               fw.jax_runner(jax, np, model, False, params, x, targets),
               fw.jax_runner(jax, np, model, True, params, x, targets)]
    for run, grads in runners:
        run()
        loss, g = grads()
        assert set(g) == set(g_ref)
        assert abs(loss - loss_ref) < 1e-5 * abs(loss_ref)
        assert fw.max_error(np, g, g_ref) < fw.TOLERANCE_F32


def test_flop_count():
    fw = _script("bench", "frameworks")

    # Elman, one weight of each kind: 2*T*B*(3*(H*H + O*H) + 2*H*I)
    assert fw.flops("elman", 1, 1, 1, 1, 1) == 2 * (3 * 2 + 2)
    assert fw.flops("lstm", 2, 3, 4, 5, 6) == 2 * 3 * 2 * (3 * (4 * 25 + 30) + 2 * 4 * 5 * 4)
