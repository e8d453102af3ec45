"""The generator fuzzer (bench/fuzz.py) at fixed seeds, inside the suite's time budget.

Random cells written through the public definition API are derived, generated,
imported and checked: every algorithm's gradients against finite differences, the
algorithms against each other, forward() and the loss against an evaluation of the
Model's own nodes that does not go through derive() or the generator. A refusal (a
DefinitionError, LossError or an engine ValueError with a message) is not a failure;
anything else is.

These tests assert zero failures and are deliberately not xfail: a failure is an
engine bug to fix (or a cell to refuse with a message), found by the fuzzer. Each
failure message names the cell, its class and the command that reproduces it
(``python bench/fuzz.py --cell I --seed S``, add ``--jit`` for a compiled cell);
``python bench/fuzz.py --cells N --seed S`` shrinks it. tests/fuzz_cases/ holds the
shrunk cells of the bugs found so far, one definition file each (``EXPECT`` says
whether a refusal is an acceptable fix), checked by ``test_fuzz_cases``: those that
still fail are the open ones.

Budget (2 cores, next to the rest of the suite): the JIT-off run of SEED_CELLS cells
takes ~10-30 s, the compiled cell ~20-60 s the first time and a few seconds after,
when Numba's cache in the system's temporary folder still holds its kernels.
"""

import glob
import json
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "bench", "fuzz.py")
CASES = sorted(glob.glob(os.path.join(ROOT, "tests", "fuzz_cases", "*.py")))

sys.path.insert(0, os.path.join(ROOT, "bench"))
import fuzz  # noqa: E402

SEED = 20240601
SEED_CELLS = 40  # JIT off, ~0.5 s a cell; cells 1, 4 and 10 are bidirectional, 30 and 35
# run their one state in reverse, 9 and 12 read three inputs, 15, 16, 21-24, 29, 33, 38 two
COMPILED_CELL = 34  # a cell of SEED compiled by Numba (exp, sigmoid, tanh, a custom loss)
#: Numba's cache for the compiled cell, kept between runs (keyed by the module's source).
CACHE = os.path.join(tempfile.gettempdir(), "bpttgen-fuzz-pytest-cache")


def _run(args, timeout):
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    try:
        proc = subprocess.run([sys.executable, FUZZ, *args, "--json", out], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        try:
            with open(out) as f:
                summary = json.load(f)
        except ValueError:  # the fuzzer itself failed before writing its summary
            pytest.fail(f"bench/fuzz.py {' '.join(args)} wrote no summary "
                        f"(exit status {proc.returncode}):\n{proc.stderr[-3000:]}")
    finally:
        os.unlink(out)
    return proc, summary


def _failure_report(summary, jit):
    lines = []
    for cls, cells in summary["failures"].items():
        for i in cells:
            detail = summary["failure_details"][str(i)]
            lines.append(f"cell {i}: {cls}: {(detail['message'] or '')[:300]}\n"
                         f"    reproduce: python bench/fuzz.py --cell {i} "
                         f"--seed {summary['seed']}{' --jit' if jit else ''}")
    return "\n".join(lines)


def test_generator_is_deterministic_and_prints_python():
    """A cell is a pure function of (seed, index); its source and its shrink candidates
    are valid Python."""
    for i in range(25):
        spec = fuzz.generate_spec(SEED, i)
        assert spec == fuzz.generate_spec(SEED, i)
        source = fuzz.cell_source(spec)
        compile(source, f"cell{i}", "exec")
        for k, cand in enumerate(fuzz.shrink_candidates(spec)):
            compile(fuzz.cell_source(cand), f"cell{i}-{k}", "exec")


def test_fixed_seed_draws_what_the_fuzzer_draws():
    """SEED's cells include bidirectional ones (a reverse state) and cells of two and
    of three inputs, so that the run below checks them; a change of the generator that
    loses them needs another SEED."""
    specs = [fuzz.generate_spec(SEED, i) for i in range(SEED_CELLS)]
    reverse = [i for i, s in enumerate(specs) if any(st.get("reverse") for st in s["states"])]
    both = [i for i in reverse if not all(st.get("reverse") for st in specs[i]["states"])]
    assert both, f"no cell of seed {SEED} reads a forward and a reverse state"
    inputs = {len(s["input"]) for s in specs}
    assert {2, 3} <= inputs, f"the cells of seed {SEED} have {sorted(inputs)} inputs"


def test_fuzz_fixed_seed_without_jit():
    """SEED_CELLS cells with NUMBA_DISABLE_JIT=1: the printed math and every Python-level
    error (not Numba's typing)."""
    proc, summary = _run(["--cells", str(SEED_CELLS), "--seed", str(SEED), "--jit-every", "0",
                          "--no-shrink"], timeout=600)
    assert summary["cells"] == SEED_CELLS, proc.stderr[-3000:]
    assert not summary["failures"], (
        f"{sum(map(len, summary['failures'].values()))} of {SEED_CELLS} fuzz cells fail "
        f"(engine bugs; shrink them with python bench/fuzz.py --cells {SEED_CELLS} --seed "
        f"{SEED} --jit-every 0):\n" + _failure_report(summary, jit=False))


def test_fuzz_compiled_cell():
    """One cell compiled by Numba: its typing and the compiled kernels' numbers."""
    proc, summary = _run(["--cells", "1", "--start", str(COMPILED_CELL), "--seed", str(SEED),
                          "--jit-every", "1", "--no-shrink", "--cache-dir", CACHE],
                         timeout=900)
    assert summary["cells"] == 1 and summary["compiled"] == 1, proc.stderr[-3000:]
    assert not summary["failures"], _failure_report(summary, jit=True)
    assert summary["outcomes"].get("ok") == 1, (
        f"cell {COMPILED_CELL} of seed {SEED} is refused now ({summary['refusals']}): pick a "
        "COMPILED_CELL that compiles, or the test checks nothing")


@pytest.mark.skipif(not CASES, reason="no shrunk fuzz cases in tests/fuzz_cases/")
def test_fuzz_cases():
    """The shrunk cells of the bugs the fuzzer found (tests/fuzz_cases/*.py), JIT off; a
    file may set EXPECT = "refused" when refusing the cell is the fix."""
    proc = subprocess.run([sys.executable, FUZZ, "--case", *CASES], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0 and not failed, "\n".join(failed) or proc.stderr[-3000:]
