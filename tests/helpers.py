"""Shared test helpers: the registry of cases, random problems, finite differences."""

import numpy as np

from bpttgen.codegen.runtime.gradcheck import finite_difference, max_relative_error  # noqa: F401 (re-exported)
from bpttgen.derive import mse, sigmoid_bce, softmax_cross_entropy, sse
from bpttgen.derive.models import BUILTIN, elman, lstm

LOSSES = {"softmax_ce": softmax_cross_entropy, "sse": sse, "mse": mse,
          "sigmoid_bce": sigmoid_bce}

#: case id -> zero-argument function building the model. Every built-in model, and
#: every loss on the Elman net and the LSTM (the loss code is shared by all models).
CASES = {name: build for name, build in BUILTIN.items()}
for _loss_name, _loss in LOSSES.items():
    if _loss_name != "softmax_ce":
        CASES[f"elman-{_loss_name}"] = (lambda l=_loss: elman(loss=l))
        CASES[f"lstm-{_loss_name}"] = (lambda l=_loss: lstm(loss=l))


#: Built-ins whose tests cost the most (layernorm_lstm compiles about twice the LSTM's
#: kernels: 2-3 minutes of a cold suite). They run every tier that needs their own
#: kernels (the unrolled check, gradients against finite differences, every algorithm,
#: the CUDA simulator's bptt and forward, LaTeX); the checks of code they share with a
#: cheaper built-in of the same constructs run on that one only (rmsnorm: reductions):
#: RTRL, float32 PTX (layernorm_lstm's float64 PTX too: test_cuda.PTX_COVERED), the
#: simulator's tbptt, the reference's second variant. Keeps the suite inside its 10-minute budget on 2 cores. bielman (a
#: bidirectional Elman layer) repeats the Elman net's constructs in its kernels: its
#: float32 PTX and the reference's second variant are the Elman net's; its own
#: tiers (the reverse loop, naive's mirrored windows in the simulator) all run.
#: embed_lstm: the LSTM's gates over an embedding lookup, whose own code (gather,
#: scatter-add, RTRL's one-hot direction, the CUDA runtime's two kernels in both
#: dtypes) is also checked by tests/test_embedding.py's cells, generate's verification
#: and the fuzzer's token cells.
COSTLY = {"layernorm_lstm", "bielman", "embed_lstm"}

#: Cases run through generated Numba modules. Each costs a Numba compilation (the
#: dominant cost of the suite), so the losses are generated on the Elman net only:
#: the loss kernel is printed from the Loss alone, the same for every model.
GENERATED_CASES = [c for c in CASES if not c.startswith("lstm-")]


def skip_refused(module, algorithm):
    """Skip a test of an algorithm the module refuses: a model with a reverse state (a
    bidirectional layer) runs no online or checkpointed algorithm
    (tests/test_bidirectional.py checks the refusals)."""
    import pytest

    if algorithm not in module.ALGORITHMS:
        pytest.skip(f"{module.NAME} has a reverse state: {algorithm} does not apply")


def tiny_sizes(derivation, n=3):
    """Every size n, but a little different so transposes cannot hide."""
    return {s: n + (i % 2) for i, s in enumerate(derivation.sizes)}


def random_problem(derivation, sizes, T=4, B=2, seed=0, scale=0.5):
    """params, x, targets, state0 in float64."""
    rng = np.random.default_rng(seed)
    params = {p.name: rng.normal(0, scale, [sizes[s] for s in p.shape])
              for p in derivation.params}
    if derivation.tokens:  # (T, B) integer tokens: finite differences never move them
        ((_, vocab),) = derivation.inputs
        x = rng.integers(0, sizes[vocab], (T, B))
    else:  # several inputs side by side
        x = rng.normal(0, 1, (T, B, sum(sizes[size] for _, size in derivation.inputs)))
    O = sizes[derivation.loss.size]
    if derivation.loss.loss.target == "index":
        targets = rng.integers(0, O, (T, B))
    else:
        targets = rng.uniform(0, 1, (T, B, O))
    state0 = {s.name: rng.normal(0, 0.5, (B, sizes[s.size])) for s in derivation.states}
    return params, x, targets, state0


def tbptt_reference(D, params, x, targets, state0, k1, k2):
    """tbptt(k1, k2) by its definition, evaluated with the NumPy reference: each
    window's losses, differentiated with the state before the window held fixed,
    summed (weighted as the generated modules weight them: by all T*B steps)."""
    from bpttgen.codegen.runtime import windows
    from bpttgen.derive import reference

    T, B = x.shape[:2]
    trajectory, _ = reference._run_forward(D, params, x, state0)
    expected = {k: np.zeros_like(v) for k, v in params.items()}
    for end, start, first in windows("tbptt", T, k1, k2):
        s0 = state0 if start == 0 else {s.name: trajectory[start - 1][s.name]
                                         for s in D.states}
        w = np.zeros((end - start + 1, B))
        w[first - start:] = 1
        _, g = reference.loss_and_grads(D, params, x[start:end + 1], targets[start:end + 1],
                                        state0=s0, mask=w)
        for k in expected:
            expected[k] += g[k] * w.sum() / (T * B)
    return expected


def fuzz_derivations(seed, cells):
    """[(label, Derivation)] of the fuzzer's cells seed/0..cells-1 that derive (a
    refused definition is skipped): cells no built-in resembles, for checks that any
    cell must pass."""
    import os
    import sys
    import tempfile

    from bpttgen.derive.derivation import derive
    from bpttgen.derive.loader import load_model

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import fuzz

    out, folder = [], tempfile.mkdtemp(prefix="bpttgen-fuzz-cells-")
    for i in range(cells):
        path = os.path.join(folder, f"cell_{i}.py")
        with open(path, "w") as f:
            f.write(fuzz.cell_source(fuzz.generate_spec(seed, i)))
        try:
            out.append((f"fuzz-{seed}-{i}", derive(load_model(path))))
        except ValueError:  # a refused definition (DefinitionError, LossError)
            continue
    return out


def readme_blocks():
    """({name: text} of the README's blocks marked <!-- readme-test: name -->, the
    README's text)."""
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        text = f.read()
    return dict(re.findall(r"<!-- readme-test: (\S+) -->\n```\w*\n(.*?)```", text, re.S)), text
