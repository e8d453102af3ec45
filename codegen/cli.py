"""The ``bpttgen`` command: the user-facing end of the data flow.

Subcommands: list, latex, generate (more are added by the modules they drive).
Errors a user can fix (a bad definition, a refused overwrite) print one line and
exit with status 2 instead of a traceback.
"""

import argparse
import sys

from derive import DefinitionError, derive
from derive.losses import LossError
from derive.loader import load_model
from derive.models import BUILTIN, build

from .generate import BUILTINS_COMMAND, GENERATED_DIR, OverwriteRefused, generate, \
    generate_builtins


def _cmd_list(args):
    for name in BUILTIN:
        d = derive(build(name))
        states = ", ".join(s.name for s in d.states)
        updates = "; ".join(f"{s.name} = {d.node(s.name).expr}" for s in d.states)
        print(f"{name:14s} states {states:10s} {updates}")
    return 0


def _cmd_latex(args):
    from derive.latex import render

    text = render(derive(load_model(args.model)), form=args.form,
                  index_form=args.index_form)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def _cmd_generate(args):
    if args.builtins == bool(args.model):
        raise SystemExit("bpttgen generate: give either --builtins or a MODEL_OR_FILE")
    if args.builtins:
        paths = generate_builtins(args.output or GENERATED_DIR, target=args.target or "all",
                                  force=args.force)
    else:
        target = args.target or "cpu"
        command = f"bpttgen generate {args.model} --target {target}"
        paths = generate(load_model(args.model), args.output or ".", command,
                         target=target, force=args.force)
    if not args.quiet:
        for p in paths:
            print(p)
    return 0


def parser():
    p = argparse.ArgumentParser(
        prog="bpttgen",
        description="Derive backpropagation through time with SymPy; generate Numba "
                    "kernels and trainers.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="built-in models and their state equations")
    s.set_defaults(run=_cmd_list)

    s = sub.add_parser("latex", help="print a model's BPTT derivation as LaTeX")
    s.add_argument("model", metavar="MODEL_OR_FILE",
                   help="a built-in name or a definition file defining model()")
    s.add_argument("--form", choices=("document", "fragment", "markdown"),
                   default="document")
    s.add_argument("--index-form", action="store_true",
                   help="add the per-element index form (seed 004's style)")
    s.add_argument("-o", "--output", help="write to this file instead of stdout")
    s.set_defaults(run=_cmd_latex)

    s = sub.add_parser("generate", help="write Numba modules for a model")
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
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(run=_cmd_generate)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (DefinitionError, LossError, OverwriteRefused, FileNotFoundError,
            ValueError) as err:
        print(f"bpttgen {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
