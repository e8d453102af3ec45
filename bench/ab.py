"""A generator change, measured: generated/<model>.py at a git revision against the
working tree's, calls interleaved in one process (float32, loss + all gradients; frameworks.py's
timed_rounds), so that the machine's drift between runs hits both alike.

    python bench/ab.py REV [--models elman,lstm,gru] [--threads 2] [--repeats 15] [--quick]
                           [--old-threads 1]

--old-threads 1 calls the old module with threads=1, the batch never split (split.py):
with REV = HEAD, the same kernels with and without the split.

Prints per size the median ms of each, old/new (above 1: the working tree is faster)
and the largest relative difference of the gradients (float32 rounding expected).
"""

import argparse
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from frameworks import SIZES, fmt_load, pin_threads, source_version, timed_rounds  # noqa: E402
QUICK_SIZES = ((2, 5, 3, 4, 3),)


_LEGACY_RUN = """
def _ab_run(kernels):
    def run(stages, t_hi, t_lo, targets, weights, scale, y, args):
        if stages != runtime.calls.EVERY_STAGE:
            raise NotImplementedError("bench/ab.py runs an old module's full BPTT only")
        return kernels["bptt"](targets, weights, scale, y, args)
    return run

"""


def module_at(rev, model, folder):
    """generated/<model>.py as it was at rev, imported under another name."""
    text = subprocess.run(["git", "show", f"{rev}:generated/{model}.py"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    # A module from before the bpttgen namespace imports the same run time by its old
    # names: the kernels are what is compared, on today's run time.
    text = text.replace("from codegen import online, runtime",
                        "from bpttgen.codegen import runtime\n"
                        "from bpttgen.codegen.runtime import online")
    text = text.replace("from codegen.kernel_functions import",
                        "from bpttgen.codegen.runtime.kernel_functions import")
    # A module from before several inputs states its one input so.
    text = re.sub(r'"input": (\(.*?\)),', r'"inputs": (\1,),', text)
    text = re.sub(r'\binput=("\w+"),', r'inputs=[\1],', text)
    # A module from before _run hands the driver its kernels by role: the full BPTT
    # call (all this script times) goes to its fused _bptt.
    text = re.sub(r"kernels=dict\((.*?forward_states=\(.*?\))\),",
                  r"run=_ab_run(dict(\1)), rtrl_kernel=None,", text, flags=re.S)
    if "_ab_run(" in text:
        text = text.replace("\n_MODEL = runtime.Model(", _LEGACY_RUN + "\n_MODEL = runtime.Model(")
    path = os.path.join(folder, f"ab_{model}.py")
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location(f"ab_{model}", path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():  # an older module may state other kernel functions
        warnings.simplefilter("ignore")
        spec.loader.exec_module(module)
    return module


def parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="git revision of the old generated modules")
    ap.add_argument("--models", default="elman,lstm,gru")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="one tiny size (a smoke run)")
    ap.add_argument("--old-threads", type=int, default=None,
                    help="threads= of the old module's calls (1: its batch never split)")
    return ap


def main(argv=None):
    """Print and return rows (model, sizes, old ms, new ms, gradient difference)."""
    import numpy as np

    args = parser().parse_args(argv)
    sys.path.insert(0, ROOT)
    print(f"# python bench/ab.py {args.rev} --models {args.models} --threads {args.threads}"
          f" --repeats {args.repeats}"
          + ("" if args.old_threads is None else f" --old-threads {args.old_threads}")
          + f"; new: {source_version()}; load {fmt_load()}")
    old_kw = {} if args.old_threads is None else {"threads": args.old_threads}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models.split(","):
            new = importlib.import_module(f"bpttgen.generated.{model}")
            old = module_at(args.rev, model, folder)
            for B, T, I, H, O in QUICK_SIZES if args.quick else SIZES:
                rng = np.random.default_rng(0)
                params = new.init_params({"I": I, "H": H, "O": O}, dtype=np.float32)
                x = rng.standard_normal((T, B, I)).astype(np.float32)
                targets = rng.integers(0, O, (T, B))
                _, g_new = new.loss_and_grads(params, x, targets)  # warm-up, compile
                _, g_old = old.loss_and_grads(params, x, targets, **old_kw)
                diff = max(float(np.abs(g_new[k] - g_old[k]).max() / np.abs(g_old[k]).max())
                           for k in g_new)
                times = timed_rounds(
                    {name: (lambda m=module, kw=kw: m.loss_and_grads(params, x, targets, **kw))
                     for name, module, kw in (("old", old, old_kw), ("new", new, {}))},
                    args.repeats, args.repeats, 0)
                o, n = (1e3 * float(np.median(times[k])) for k in ("old", "new"))
                print(f"{model:6s} {B},{T},{I},{H},{O}: old {o:9.2f} ms  new {n:9.2f} ms  "
                      f"old/new {o / n:5.2f}  grad diff {diff:.1e}", flush=True)
                rows.append(dict(model=model, sizes=(B, T, I, H, O), old=o, new=n, diff=diff))
    return rows


if __name__ == "__main__":
    pin_threads(parser().parse_args().threads)  # before NumPy loads its BLAS
    main()
