"""The ``bpttgen`` command: the user-facing end of the data flow.

Subcommands: list, latex, generate, check, train, demo (``bpttgen CMD --help``).
Errors a user can fix (a bad definition, a refused overwrite, a bad option or
file) print one line and exit with status 2 instead of a traceback; a failed
gradient check or a diverged training run exits with 1, an interrupted one
with 130 after saving a checkpoint.
"""

import argparse
import contextlib
import importlib
import os
import signal
import sys
import time
import warnings

from bpttgen.derive import DefinitionError
from bpttgen.derive.latex import FORMS
from bpttgen.derive.losses import LossError

from bpttgen.codegen.generate import (BUILTINS_COMMAND, GENERATED_DIR, OverwriteRefused,
                                      VerificationFailed)
from bpttgen.codegen.app import cluster
from bpttgen.codegen.runtime.distributed import SchedulerLost

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(ValueError):
    """A wrong combination of options or a checkpoint that does not fit them."""


# -- list, latex, generate ----------------------------------------------------------
def _cmd_list(args):
    from bpttgen.derive import derive
    from bpttgen.derive.models import BUILTIN, build

    for name in BUILTIN:
        d = derive(build(name))
        states = ", ".join(s.name for s in d.states)
        updates = "; ".join(f"{s.name} = {d.node(s.name).expr}" for s in d.states)
        print(f"{name:14s} states {states:10s} {updates}")
    return 0


def _cmd_latex(args):
    from bpttgen.derive import derive
    from bpttgen.derive.loader import load_model

    from bpttgen.derive.latex import render

    text = render(derive(load_model(args.model)), form=args.form,
                  index_form=args.index_form)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def _cmd_generate(args):
    from bpttgen.derive.loader import load_model
    from bpttgen.derive.models import BUILTIN

    from bpttgen.codegen.generate import generate, generate_builtins
    from bpttgen.codegen.runtime import Progress

    if args.builtins == bool(args.model):
        raise UsageError("give either --builtins or a MODEL_OR_FILE")
    if args.builtins:
        bar = Progress(len(BUILTIN), not args.quiet, "generating")
        try:
            paths = generate_builtins(args.output or GENERATED_DIR,
                                      target=args.target or "all", force=args.force,
                                      progress=lambda name: bar.update(),
                                      check=not args.no_check)
        finally:
            bar.close()
    else:
        target = args.target or "cpu"
        command = f"bpttgen generate {args.model} --target {target}"
        paths = generate(load_model(args.model), args.output or ".", command,
                         target=target, force=args.force, check=not args.no_check)
    if not args.quiet:
        for p in paths:
            print(p)
    return 0


# -- check --------------------------------------------------------------------------
def _cmd_check(args):
    from bpttgen.derive.loader import load_model

    from bpttgen.codegen.runtime import gradcheck
    from bpttgen.codegen.generate import generate_cached, import_path
    from bpttgen.codegen.runtime import Progress

    model = load_model(args.model)
    with contextlib.ExitStack() as stack:
        # No verify(): the compiled check below is the full version, with a table.
        path = generate_cached(model, f"bpttgen check {args.model}", stack, check=False)
        name = f"bpttgen_check_{model.name}"
        module = import_path(path, name)
        try:
            bar = Progress(len(gradcheck.algorithms(module)), not args.quiet,
                           f"checking {model.name} (its first run compiles)")
            rows = gradcheck.check(module, size=args.size, T=args.steps, B=args.batch,
                                   seed=args.seed, progress=lambda a: bar.update())
            bar.close()
        finally:
            sys.modules.pop(name, None)
    # (a model with a reverse state runs no tbptt)
    tbptt = " (tbptt with k1 = k2 = T)" if "tbptt" in gradcheck.algorithms(module) else ""
    print(f"{model.name}: float64 gradients vs central finite differences, sizes "
          f"{args.size}/{args.size + 1}, T={args.steps}, B={args.batch}, with a mask, "
          f"initial states and L2{tbptt}")
    print(gradcheck.format_table(rows))
    failed = [r.param for r in rows if not r.passed]
    if failed:
        print(f"FAILED: max relative error >= {gradcheck.TOLERANCE:g} for {', '.join(failed)}")
        return EXIT_FAILED
    print(f"all gradients agree (max relative error < {gradcheck.TOLERANCE:g})")
    return 0


# -- train --------------------------------------------------------------------------
#: Options that decide the data and the shapes: a checkpoint only resumes a run
#: made with the same ones.
_RUN_IDENTITY = ("model", "task", "text", "seq_len", "samples", "seed", "batch_size",
                 "hidden", "dtype", "validation")


def _trainer_module(spec, generated_dir, stack):
    """The generated module of a model: the committed one for a built-in (Numba's
    cache is warm), else generated into generated_dir or the module cache (a second
    run loads the kernels the first compiled; ``stack``, an ExitStack, removes the
    temporary folder used where the cache cannot be written)."""
    from bpttgen.derive.loader import load_model
    from bpttgen.derive.models import BUILTIN

    from bpttgen.codegen.generate import generate, generate_cached, import_path

    if spec in BUILTIN and os.path.isfile(os.path.join(GENERATED_DIR, f"{spec}.py")):
        return importlib.import_module(f"bpttgen.generated.{spec}")
    model = load_model(spec)
    command = f"bpttgen generate {spec} --target cpu"
    if generated_dir:
        path, = generate(model, generated_dir, command)
    else:
        path = generate_cached(model, command, stack)
    return import_path(path, f"bpttgen_train_{model.name}")


def _load_task(args, module):
    from bpttgen.codegen.app import tasks

    target = module.SPEC["target"]
    if len(module.SPEC["inputs"]) > 1:
        names = [name for name, _ in module.SPEC["inputs"]]
        raise UsageError(f"{module.NAME} reads {len(names)} inputs {names}; the tasks and "
                         "--text give one: train it from Python, Trainer.fit(x, targets) "
                         "with x a dict of them (README, 'Several inputs')")
    if args.text:
        return tasks.text(args.text, args.seq_len or 50, target=target,
                          tokens=module.SPEC.get("tokens", False))
    if module.SPEC.get("tokens"):
        raise UsageError(f"{module.NAME} reads integer tokens: train it on --text FILE "
                         "(the tasks give vectors)")
    return tasks.make(args.task, args.seq_len or 30, args.samples, target=target,
                      seed=args.seed)


def _held_out(args, task):
    """(training task, fit's validation (x, targets, mask) or None): --validation holds
    out the last fraction of the task's sequences."""
    if not args.validation:
        return task, None
    N = task.x.shape[1]
    k = round(args.validation * N)
    if not 0 < args.validation < 1 or not 1 <= k < N:
        raise UsageError(f"--validation must hold out at least one of the {N} sequences "
                         f"and leave one to train on (a fraction in (0, 1)), got "
                         f"{args.validation}")
    train, held = task.split(k)
    return train, (held.x, held.targets, held.mask)


def _sizes(module, task, hidden):
    """Input and output sizes from the task, every other size --hidden."""
    sizes = {s: hidden for s in module.SIZES}
    ((_, input_size),) = module.SPEC["inputs"]  # _load_task refuses several
    sizes[input_size] = task.sizes["I"]
    sizes[module.SPEC["output"][1]] = task.sizes["O"]
    return sizes


def _memory_limit(args):
    if args.memory_limit is None:
        return None
    if not args.memory_limit > 0:
        raise UsageError(f"--memory-limit must be a positive number of MiB, got "
                         f"{args.memory_limit}")
    return int(args.memory_limit * 2 ** 20)


def _identity(args, module):
    values = dict(vars(args), model=module.NAME,
                  text=os.path.abspath(args.text) if args.text else None)
    return {k: values[k] for k in _RUN_IDENTITY}


class _Interrupt:
    """Ctrl-C asks training to stop after the current minibatch (the parameters
    are then consistent and are checkpointed); a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C is not ours to catch
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this minibatch and saving a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def _cmd_train(args):
    import contextlib

    if bool(args.task) == bool(args.text):
        raise UsageError("give either --task {adding,copy,parity} or --text FILE")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    with contextlib.ExitStack() as stack:
        module = _trainer_module(args.model, args.generated_dir, stack)
        client = stack.enter_context(cluster.client(args.workers, args.scheduler))
        return _train(args, module, client)


def _train(args, module, client=None):
    import math

    import numpy as np

    if args.stream:
        return _train_stream(args, module)
    task, held = _held_out(args, _load_task(args, module))
    if args.batch_size > task.x.shape[1]:
        args.batch_size = task.x.shape[1]
    output = args.output or f"{module.NAME}-{args.task or 'text'}.npz"
    checkpoint = args.checkpoint or os.path.splitext(output)[0] + ".ckpt.npz"
    identity = _identity(args, module)
    trainer = module.Trainer(
        _sizes(module, task, args.hidden), optimizer=args.optimizer, lr=args.lr,
        l2=args.l2, clip=args.clip, algorithm=args.algorithm, k1=args.k1, k2=args.k2,
        c=args.c, every=args.every, seed=args.seed,
        dtype=np.float32 if args.dtype == "float32" else np.float64, momentum=args.momentum,
        memory_limit=_memory_limit(args))
    if args.resume:
        if not os.path.isfile(checkpoint):
            raise UsageError(f"--resume: no checkpoint at {checkpoint}")
        trainer.load(checkpoint)
        saved = trainer.meta.get("run", {})
        for key in _RUN_IDENTITY:
            if key in saved and saved[key] != identity[key]:
                raise UsageError(
                    f"--resume: {checkpoint} was made with {key} = {saved[key]!r}, this "
                    f"run has {identity[key]!r}; use the same options (or a new "
                    "--checkpoint)")
    meta = {"run": identity, "vocabulary": task.vocabulary}
    index_loss = module.SPEC["target"] == "index"
    say = (lambda *a: None) if args.quiet else print
    N = task.x.shape[1]
    epoch0, batch0 = trainer.position if args.resume else (0, 0)
    say(f"training {module.NAME} on {task.name}: {N} sequences of T = {task.x.shape[0]}, "
        f"sizes {trainer.sizes}, {trainer.algorithm}, {trainer.optimizer} lr {trainer.lr}"
        + (f"; resuming at epoch {epoch0 + 1}, minibatch {batch0 + 1}" if args.resume
           else ""))
    if task.baseline is not None:
        say(f"  a model without memory reaches loss {task.baseline:.4f}"
            + (f" (perplexity {math.exp(task.baseline):.2f})" if index_loss else ""))

    since = {"n": 0}

    def save_checkpoint():
        trainer.save(checkpoint, meta=meta)
        since["n"] = 0

    def callback(tr, info):
        if info["event"] == "epoch":
            line = f"epoch {info['epoch'] + 1}/{args.epochs}  loss {info['loss']:.4f}"
            if index_loss:
                line += f"  perplexity {math.exp(min(info['loss'], 700)):.3f}"
            if "val_loss" in info:
                line += f"  held-out loss {info['val_loss']:.4f}"
                if index_loss:
                    line += f"  perplexity {math.exp(min(info['val_loss'], 700)):.3f}"
            say(line)
        else:
            since["n"] += 1
        stop = interrupt.requested  # read once: the checkpoint and the answer agree
        if stop or (args.checkpoint_every and since["n"] >= args.checkpoint_every):
            save_checkpoint()
        return stop

    start = time.perf_counter()
    with _Interrupt() as interrupt, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a divergence is reported below
        try:
            trainer.fit(task.x, task.targets, epochs=args.epochs, batch_size=args.batch_size,
                        mask=task.mask, progress=not args.quiet, callback=callback,
                        resume=args.resume, client=client, validation=held)
        except SchedulerLost as err:  # the trainer is at its last finished minibatch
            save_checkpoint()
            print(f"bpttgen train: {err}; checkpoint saved to {checkpoint}. Continue with "
                  "the same command and --resume", file=sys.stderr)
            return EXIT_FAILED
    seconds = time.perf_counter() - start
    epoch, batch = trainer.position
    return _finish(args, trainer, output, checkpoint, meta, seconds, index_loss,
                   interrupted=interrupt.requested and
                   f"at epoch {epoch + 1}, minibatch {batch}",
                   baseline=task.baseline, title=task.name)


def _finish(args, trainer, output, checkpoint, meta, seconds, index_loss, *, interrupted,
            baseline, title):
    """The end of a training run, its exit status: parameters that diverged saved with
    the message; an interruption (``interrupted``: where it stopped, or False) pointing
    at its checkpoint; else the parameters saved, the checkpoint removed (the output
    holds the same, finished state), a summary and the training curve."""
    import math

    if trainer.diverged:
        trainer.save(output, meta=meta)
        print(f"bpttgen train: {trainer.diverged}; saved them to {output}", file=sys.stderr)
        return EXIT_FAILED
    if interrupted:
        print(f"interrupted {interrupted} ({trainer.steps} updates); checkpoint saved to "
              f"{checkpoint}. Continue with the same command and --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    trainer.save(output, meta=meta)
    if os.path.exists(checkpoint) and os.path.abspath(checkpoint) != os.path.abspath(output):
        os.remove(checkpoint)
    final = trainer.history["loss"][-1] if trainer.history["loss"] else float("nan")
    summary = f"final loss {final:.4f}"
    if index_loss:
        summary += f", perplexity {math.exp(min(final, 700)):.3f}"
    if trainer.history.get("val_loss"):
        summary += f", held-out loss {trainer.history['val_loss'][-1]:.4f}"
    summary += f"; {trainer.steps} updates in {seconds:.1f} s; parameters saved to {output}"
    if not args.no_plot and trainer.history["loss"]:
        png = args.plot or os.path.splitext(output)[0] + ".png"
        trainer.plot(png, baseline=baseline, title=title)
        summary += f", training curve to {png}"
    print(summary)
    return 0


def _train_stream(args, module):
    """bpttgen train --text FILE --stream: Trainer.fit_stream over the file's chunks,
    one pass an epoch; checkpoints every --checkpoint-every chunks and on Ctrl-C hold
    the stream's position, and --resume reads on from it."""
    import math

    import numpy as np

    from bpttgen.codegen.app import tasks

    if not args.text:
        raise UsageError("--stream reads a --text FILE")
    if args.algorithm not in ("tbptt", "rtrl", "artbp"):
        raise UsageError(f"--stream trains with --algorithm tbptt, rtrl or artbp (they "
                         f"look back a bounded number of steps), not {args.algorithm}")
    if args.workers or args.scheduler:
        raise UsageError("--stream runs in one process (no --workers or --scheduler)")
    if args.validation:
        raise UsageError("--validation holds out whole sequences; --stream trains on one "
                         "pass of the file (hold out the text's end in a file of its own)")
    text = tasks.TextStream(args.text, args.batch_size, args.chunk,
                            target=module.SPEC["target"],
                            tokens=module.SPEC.get("tokens", False))
    try:
        output = args.output or f"{module.NAME}-text.npz"
        checkpoint = args.checkpoint or os.path.splitext(output)[0] + ".ckpt.npz"
        identity = dict(_identity(args, module), chunk=args.chunk, stream=True)
        trainer = module.Trainer(
            _sizes(module, text, args.hidden), optimizer=args.optimizer, lr=args.lr,
            l2=args.l2, clip=args.clip, algorithm=args.algorithm, k1=args.k1, k2=args.k2,
            c=args.c, every=args.every, seed=args.seed, momentum=args.momentum,
            dtype=np.float32 if args.dtype == "float32" else np.float64,
            memory_limit=_memory_limit(args))
        epoch0, resume = 0, False
        if args.resume:
            if not os.path.isfile(checkpoint):
                raise UsageError(f"--resume: no checkpoint at {checkpoint}")
            trainer.load(checkpoint)
            if trainer.meta.get("run") != identity:
                raise UsageError(f"--resume: {checkpoint} was made with other options "
                                 f"({trainer.meta.get('run')}); use the same ones")
            epoch0, resume = trainer.meta["epoch"], trainer.stream is not None
        say = (lambda *a: None) if args.quiet else print
        say(f"training {module.NAME} on {args.text} as {args.batch_size} streams of "
            f"{text.steps} steps, read {args.chunk} at a time; sizes {trainer.sizes}, "
            f"{trainer.algorithm}" + (f"; resuming in epoch {epoch0 + 1} at step "
                                      f"{trainer.stream.pos}" if resume else ""))
        say(f"  a model without memory reaches loss {text.baseline:.4f}")
        meta = {"run": identity, "vocabulary": text.vocabulary, "epoch": epoch0}
        since = {"n": 0}

        def save_checkpoint():
            trainer.save(checkpoint, meta=meta)
            since["n"] = 0

        def callback(tr, info):
            since["n"] += 1
            stop = interrupt.requested
            if stop or (args.checkpoint_every and since["n"] >= args.checkpoint_every):
                save_checkpoint()
            return stop

        start = time.perf_counter()
        with _Interrupt() as interrupt, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for epoch in range(epoch0, args.epochs):
                meta["epoch"] = epoch
                at = trainer.stream.pos if resume else 0
                loss = trainer.fit_stream(text.chunks(at), progress=not args.quiet,
                                          callback=callback, resume=resume)
                resume = False
                if trainer.diverged or interrupt.requested:
                    break
                say(f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}  perplexity "
                    f"{math.exp(min(loss, 700)):.3f}")
        return _finish(args, trainer, output, checkpoint, meta,
                       time.perf_counter() - start, True,
                       interrupted=interrupt.requested and
                       f"in epoch {meta['epoch'] + 1} at step {trainer.stream.pos}",
                       baseline=text.baseline, title="text (streamed)")
    finally:
        text.close()


# -- demo ---------------------------------------------------------------------------
def _cmd_demo(args):
    from bpttgen.codegen.app import demo

    config = demo.Config()
    if args.epochs is not None:
        config.epochs = args.epochs
    try:
        demo.run(config, quiet=args.quiet, plot=None if args.no_plot else args.plot)
    except RuntimeError as err:
        print(f"bpttgen demo: {err}", file=sys.stderr)
        return EXIT_FAILED
    return 0


# -- the parser ---------------------------------------------------------------------
def _model_argument(s):
    s.add_argument("model", metavar="MODEL_OR_FILE",
                   help="a built-in name (see 'bpttgen list') or a definition file "
                        "defining model()")


def _quiet(s):
    s.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars or per-epoch lines")


def parser():
    from bpttgen.codegen.runtime import CPU_ALGORITHMS, Trainer

    p = argparse.ArgumentParser(
        prog="bpttgen",
        description="Derive backpropagation through time with SymPy; generate Numba "
                    "kernels and trainers.",
        epilog="New here? Run 'bpttgen demo'.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("list", help="built-in models and their state equations",
                       description="List the built-in models, one line each: the states "
                                   "and their update equations.")
    s.set_defaults(run=_cmd_list)

    s = sub.add_parser("latex", help="print a model's BPTT derivation as LaTeX",
                       description="Print the derivation of a model's BPTT: forward "
                                   "step, loss, accumulated recurrence, gradients.")
    _model_argument(s)
    s.add_argument("--form", choices=FORMS, default="document",
                   help="document: a LaTeX article; fragment: its numbered equations; "
                        "markdown: $$ blocks (GitHub, Jupyter); text: plain Unicode for a "
                        "terminal")
    s.add_argument("--index-form", action="store_true",
                   help="add the per-element index form (seed 004's style)")
    s.add_argument("-o", "--output", help="write to this file instead of stdout")
    s.set_defaults(run=_cmd_latex)

    s = sub.add_parser("generate", help="write Numba modules for a model",
                       description="Write the generated module(s) of a model. A file in "
                                   "the way is overwritten only if bpttgen generated it "
                                   "and nobody edited it since (or with --force).")
    s.add_argument("model", metavar="MODEL_OR_FILE", nargs="?",
                   help="a built-in name or a definition file defining model()")
    s.add_argument("--builtins", action="store_true",
                   help=f"regenerate every built-in model (the command '{BUILTINS_COMMAND}')")
    s.add_argument("--target", choices=("cpu", "cuda", "all"), default=None,
                   help="cpu (default for a model), cuda, or all (default for --builtins)")
    s.add_argument("-o", "--output", help="output folder (default: generated/ for "
                   "--builtins, the current folder otherwise)")
    s.add_argument("--force", action="store_true",
                   help="overwrite files that were edited by hand")
    s.add_argument("--no-check", action="store_true",
                   help="write the module without first checking its float64 gradients "
                        "against finite differences (the check takes about a second)")
    _quiet(s)
    s.set_defaults(run=_cmd_generate)

    s = sub.add_parser("check", help="check gradients against finite differences",
                       description="Generate the model's kernels into a temporary folder "
                                   "and compare the gradients of every algorithm with "
                                   "float64 central finite differences. Exit status 1 "
                                   "if any relative error is 1e-6 or more.")
    _model_argument(s)
    s.add_argument("--size", type=int, default=3, help="every size (3: tiny, fast)")
    s.add_argument("--steps", type=int, default=5, metavar="T", help="sequence length")
    s.add_argument("--batch", type=int, default=2, metavar="B", help="batch size")
    s.add_argument("--seed", type=int, default=0)
    _quiet(s)
    s.set_defaults(run=_cmd_check)

    s = sub.add_parser(
        "train", help="train a model on a synthetic task or a text file",
        description="Train a model and save its parameters. Checkpoints are written "
                    "atomically every --checkpoint-every minibatch steps and on Ctrl-C; "
                    "--resume continues from the checkpoint. A run whose loss becomes "
                    "NaN/Inf stops and keeps the last good parameters.")
    _model_argument(s)
    data = s.add_argument_group("data (one of)")
    data.add_argument("--task", choices=("adding", "copy", "parity"),
                      help="adding: sum of two marked numbers (long dependency); copy: "
                           "repeat symbols after a delay; parity: running XOR of bits")
    data.add_argument("--text", metavar="FILE",
                      help="a UTF-8 text file: character-level language model (one-hot "
                           "characters, or tokens for a model of token inputs: "
                           "--model embed_lstm)")
    data.add_argument("--stream", action="store_true",
                      help="--text read in chunks, never whole (a file larger than "
                           "memory): --batch-size streams side by side, trained with "
                           "tbptt, rtrl or artbp; an epoch is one pass")
    data.add_argument("--chunk", type=int, default=4096,
                      help="--stream: steps read at a time (default 4096)")
    data.add_argument("--seq-len", type=int, default=None,
                      help="sequence length T (default 30 for a task, 50 for text)")
    data.add_argument("--samples", type=int, default=1000,
                      help="number of synthetic sequences (default 1000)")
    data.add_argument("--validation", type=float, default=0.0, metavar="FRACTION",
                      help="hold out this fraction of the sequences (the last ones) and "
                           "print their loss after each epoch (not with --stream)")
    opt = s.add_argument_group("training")
    opt.add_argument("--algorithm", default="bptt",
                     help=f"one of {', '.join(CPU_ALGORITHMS)} (default bptt)")
    opt.add_argument("--memory-limit", type=float, metavar="MIB",
                     help="refuse a gradient call that would take more memory; with "
                          "--algorithm checkpoint, the fastest plan within it")
    opt.add_argument("--k1", type=int, help="tbptt: update every k1 steps")
    opt.add_argument("--k2", type=int, help="tbptt: backpropagate over the last k2 steps")
    opt.add_argument("--c", type=float, help="artbp: probability of a cut at each step")
    opt.add_argument("--every", type=int, help="rtrl: update every N steps (default 1)")
    opt.add_argument("--optimizer", choices=Trainer.OPTIMIZERS, default="adam")
    opt.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01)")
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--l2", type=float, default=0.0, help="L2 regularisation")
    opt.add_argument("--clip", type=float, default=None,
                     help="clip the gradient norm to this value")
    opt.add_argument("--epochs", type=int, default=10)
    opt.add_argument("--batch-size", type=int, default=32)
    opt.add_argument("--hidden", type=int, default=32, help="every size but input and "
                     "output (default 32)")
    opt.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    opt.add_argument("--seed", type=int, default=0)
    par = s.add_argument_group('data parallel (pip install "bpttgen[distributed]")')
    par.add_argument("--workers", type=int, metavar="N",
                     help="split each minibatch over N worker processes on this machine "
                          "(a Dask LocalCluster, one thread each)")
    par.add_argument("--scheduler", metavar="ADDRESS",
                     help="split each minibatch over the workers of a running Dask "
                          "scheduler (tcp://host:8786); if it dies the run saves its "
                          "checkpoint and stops: --resume continues")
    out = s.add_argument_group("output")
    out.add_argument("-o", "--output", help="parameter file (default MODEL-TASK.npz)")
    out.add_argument("--checkpoint", help="checkpoint file (default OUTPUT with "
                     ".ckpt.npz); removed when training completes")
    out.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                     help="write the checkpoint every N minibatch steps (default 50; 0: "
                          "only on Ctrl-C). An interruption loses at most N steps")
    out.add_argument("--resume", action="store_true",
                     help="continue from the checkpoint (same data options)")
    out.add_argument("--plot", metavar="PNG",
                     help="PNG of the training curve (default OUTPUT with .png)")
    out.add_argument("--no-plot", action="store_true", help="write no PNG")
    out.add_argument("--generated-dir", metavar="DIR",
                     help="for a definition file: generate its module here (kept, so "
                          "Numba's compile cache works) instead of a temporary folder")
    _quiet(s)
    s.set_defaults(run=_cmd_train)

    s = sub.add_parser("demo", help="derive, generate, check and train: the tour",
                       description="Derive an LSTM, print an excerpt of its derivation, "
                                   "generate and gradient-check its kernels, train an "
                                   "Elman net and an LSTM on the adding problem and "
                                   "compare them. One to two minutes on 2 cores.")
    s.add_argument("--epochs", type=int, default=None, help="training epochs (default 10)")
    s.add_argument("--plot", default="bpttgen_demo.png",
                   help="PNG of the training curves (default bpttgen_demo.png)")
    s.add_argument("--no-plot", action="store_true", help="write no PNG")
    _quiet(s)
    s.set_defaults(run=_cmd_demo)
    return p


def _version():
    try:
        from importlib.metadata import version

        return version("bpttgen")
    except Exception:  # noqa: BLE001 - not installed: running from a checkout
        return "(not installed)"


def main(argv=None):
    args = parser().parse_args(argv)
    # Numba's internal pedantic IR check, not a problem of the user's model.
    from numba.core.errors import NumbaIRAssumptionWarning

    warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning)
    try:
        return args.run(args)
    except (DefinitionError, LossError, OverwriteRefused, FileNotFoundError,
            ValueError) as err:
        print(f"bpttgen {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except VerificationFailed as err:
        print(f"bpttgen {args.command}: error: {err}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
