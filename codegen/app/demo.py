"""``bpttgen demo``: the whole data flow once, on built-in models and data.

1. derive an LSTM's BPTT with SymPy and print an excerpt of the derivation;
2. render its Numba kernels into a temporary folder and import them;
3. check their gradients against finite differences, for every algorithm;
4. train an Elman net and an LSTM on the adding problem (a long dependency:
   the two numbers to add sit up to T steps before the answer);
5. print a table (model, algorithm, final loss, time) and save a PNG of the
   training curves.

Training uses the committed generated/elman.py and generated/lstm.py, whose
compiled kernels Numba caches after the first run; step 3 compiles the freshly
generated LSTM in float64 (about 10 s on a 2-core machine), the first time only: the
module cache (codegen/module_cache.py) keeps it, and its kernels, for the next run.
"""

import contextlib
import importlib
import os
import sys
import time
from dataclasses import dataclass


from bpttgen.codegen.runtime import gradcheck
from bpttgen.codegen.app import tasks
from bpttgen.codegen.runtime import Progress, plots


@dataclass
class Config:
    """Sizes of the demo's training runs (the defaults take about a minute on
    2 cores; tests pass tiny ones)."""

    seq_len: int = 30
    classes: int = 5
    train: int = 2000
    test: int = 500
    hidden: int = 32
    epochs: int = 10
    batch_size: int = 50
    lr: float = 0.02
    clip: float = 1.0
    seed: int = 0
    runs: tuple = (("elman", "bptt", {}), ("lstm", "bptt", {}))


@dataclass
class Result:
    model: str
    algorithm: str
    losses: list  # mean training loss per epoch
    test_loss: float
    seconds: float
    diverged: str = None


def _say(quiet, *lines):
    if not quiet:
        print(*lines, sep="\n", flush=True)


def derivation_excerpt(derivation, max_backward=3):
    """A few lines of the derivation as text: the forward step and the first
    adjoints of the accumulated recurrence (derive/latex.py's text form)."""
    from bpttgen.derive.latex import section_equations

    sections = section_equations(derivation)
    forward = next((eqs for title, eqs in sections.items() if title.startswith("Forward")),
                   [])
    backward = next((eqs for title, eqs in sections.items() if "Backward" in title), [])
    deltas = [e for e in backward if "δ" in e.split("=")[0]] or backward
    lines = ["Forward step:"] + ["  " + e.strip() for e in forward]
    lines += ["Backward step, the accumulated recurrence (O(T), one sweep):"]
    lines += ["  " + e.strip() for e in deltas[:max_backward]]
    return lines


def train_run(module, task, test, config, algorithm, extra, quiet):
    """Train one model on the task; returns a Result."""
    sizes = {s: config.hidden for s in module.SIZES}
    sizes.update(task.sizes)
    trainer = module.Trainer(sizes, optimizer="adam", lr=config.lr, clip=config.clip,
                             algorithm=algorithm, seed=config.seed, **extra)
    start = time.perf_counter()
    history = trainer.fit(task.x, task.targets, epochs=config.epochs,
                          batch_size=config.batch_size, mask=task.mask, progress=not quiet)
    seconds = time.perf_counter() - start
    test_loss, _ = trainer.loss_and_grads(test.x, test.targets, mask=test.mask)
    return Result(module.NAME, _algorithm_label(algorithm, extra), history["loss"],
                  float(test_loss), seconds, trainer.diverged)


def _algorithm_label(algorithm, extra):
    if algorithm == "tbptt":
        return f"tbptt({extra['k1']},{extra['k2']})"
    return algorithm


def results_table(results, baseline):
    header = ["model", "algorithm", "final loss", "test loss", "time"]
    body = [[r.model, r.algorithm, f"{r.losses[-1]:.3f}" if r.losses else "-",
             f"{r.test_loss:.3f}", f"{r.seconds:.1f} s"] for r in results]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
             for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"(no memory, predicting the class frequencies: loss {baseline:.3f})")
    return "\n".join(lines)


def plot_results(results, baseline, path):
    """A PNG of the training curves of the demo's runs; returns its path."""
    curves = {f"{r.model} {r.algorithm}": r.losses for r in results}
    return plots.plot_curves(curves, path, baseline=baseline, title="adding problem",
                             ylabel="training loss (cross-entropy)")


def run(config=None, *, quiet=False, plot="bpttgen_demo.png"):
    """The demo; returns (gradient check rows, training results). Raises
    RuntimeError if the gradient check fails."""
    from bpttgen.derive import derive
    from bpttgen.derive.models import build

    from bpttgen.codegen.generate import generate_cached, import_path

    config = config or Config()
    t0 = time.perf_counter()
    _say(quiet, "bpttgen demo: derive, generate, check and train a recurrent net.", "")

    _say(quiet, "[1/5] Deriving BPTT for an LSTM with SymPy")
    model = build("lstm")
    derivation = derive(model)
    _say(quiet, *derivation_excerpt(derivation),
         "  (the whole derivation: bpttgen latex lstm --form text)", "")

    with contextlib.ExitStack() as stack:
        _say(quiet, "[2/5] Generating its Numba kernels")
        # check=False: the compiled check below is the one the tour shows. In the
        # module cache: a second demo loads the kernels the first compiled.
        path = generate_cached(model, "bpttgen demo", stack, check=False)
        with open(path) as f:
            n_lines = sum(1 for _ in f)
        _say(quiet, f"  {path} ({n_lines} lines)", "")
        module = import_path(path, "bpttgen_demo_lstm")
        try:
            _say(quiet, "[3/5] Checking its gradients against finite differences (float64; "
                        "the first demo compiles the kernels, later ones load them)")
            algs = gradcheck.algorithms(module)
            bar = Progress(len(algs), not quiet, "  gradient check")
            rows = gradcheck.check(module, progress=lambda a: bar.update())
            bar.close()
            _say(quiet, gradcheck.format_table(rows), "")
        finally:
            sys.modules.pop("bpttgen_demo_lstm", None)
    failed = [r.param for r in rows if not r.passed]
    if failed:
        raise RuntimeError(f"gradient check failed for {failed}")

    _say(quiet, f"[4/5] Training on the adding problem: T = {config.seq_len}, the two "
                f"marked numbers in [0, 1] to add, their sum binned in {config.classes} "
                f"classes, scored at the last step; {config.train} sequences, "
                f"{config.epochs} epochs, Adam")
    data = tasks.adding(config.seq_len, config.train + config.test, classes=config.classes,
                        seed=config.seed)
    train, test = data.split(config.test)
    results = []
    for name, algorithm, extra in config.runs:
        module = importlib.import_module(f"bpttgen.generated.{name}")
        r = train_run(module, train, test, config, algorithm, extra, quiet)
        results.append(r)
        if r.losses:
            _say(quiet, f"  {r.model} {r.algorithm}: loss {r.losses[0]:.3f} after the first "
                        f"epoch, {r.losses[-1]:.3f} after the last ({r.seconds:.1f} s)")
    _say(quiet, "")

    _say(quiet, "[5/5] Results", results_table(results, data.baseline))
    for r in results:
        learned = r.test_loss < 0.75 * data.baseline
        _say(quiet, f"  {r.model}: " + (
            "learned to carry the numbers across the gap" if learned else
            "has not learned the long dependency (its loss is near that of a model "
            "without memory)"))
    for r in results:
        if r.diverged:
            _say(quiet, f"  {r.model}: {r.diverged}")
    if plot:
        png = plot_results(results, data.baseline, plot)
        _say(quiet, f"  training curves: {os.path.abspath(png)}")
    _say(quiet, f"demo finished in {time.perf_counter() - t0:.0f} s")
    return rows, results
