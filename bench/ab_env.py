"""One setting of the environment against another, in two live processes timed in
turn (float32 loss + all gradients): for what a process sets once and cannot switch,
such as Numba's CPU target (BPTTGEN_VECTOR_WIDTH=256 against 512-bit vectors).

    python bench/ab_env.py "BPTTGEN_VECTOR_WIDTH=256" "" [--models elman,lstm,gru]
        [--rounds 9] [--seconds 0.3] [--sizes B,T,I,H,O ...]

Each round asks A, then B (then B, then A: the order alternates) for as many calls as
fill --seconds, after a --pause, and keeps each one's median call; the two processes
hold their compiled modules, so only the calls are timed. Prints the median over rounds of each
and A/B (above 1: B is faster), with the largest relative difference of the gradients.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from frameworks import SIZES  # noqa: E402

WORKER = r"""
import importlib, json, sys, time
import numpy as np
modules = {}
for line in sys.stdin:
    cmd = json.loads(line)
    m = modules.get(cmd["model"]) or importlib.import_module("bpttgen.generated." + cmd["model"])
    modules[cmd["model"]] = m
    B, T, I, H, O = cmd["size"]
    rng = np.random.default_rng(0)
    params = m.init_params({"I": I, "H": H, "O": O}, dtype=np.float32)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    targets = rng.integers(0, O, (T, B))
    time.sleep(cmd.get("pause", 0.0))  # the other process's BLAS threads stop spinning
    _, g = m.loss_and_grads(params, x, targets)
    times, end = [], time.perf_counter() + cmd["seconds"]
    while len(times) < 3 or time.perf_counter() < end:
        t0 = time.perf_counter()
        m.loss_and_grads(params, x, targets)
        times.append(time.perf_counter() - t0)
    out = {"ms": 1e3 * float(np.median(times))}
    if cmd.get("grads"):
        out["grads"] = {k: v.ravel()[:4096].tolist() for k, v in g.items()}
    print(json.dumps(out), flush=True)
"""


def start(assignments):
    env = dict(os.environ)
    for item in shlex.split(assignments):
        key, _, value = item.partition("=")
        env[key] = value
    return subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


def ask(proc, **cmd):
    proc.stdin.write(json.dumps(cmd) + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help='settings of A, as "NAME=value NAME2=value" ("" for none)')
    ap.add_argument("b", help="settings of B")
    ap.add_argument("--models", default="elman,lstm,gru")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--seconds", type=float, default=0.3, help="per process per round")
    ap.add_argument("--sizes", nargs="*", help="B,T,I,H,O each (default: frameworks.py's)")
    ap.add_argument("--pause", type=float, default=0.25,
                    help="s before each block: OpenBLAS's idle threads spin 0.1-0.2 s after "
                         "a product on several threads, slowing the other process's block")
    args = ap.parse_args(argv)
    sizes = [tuple(map(int, s.split(","))) for s in args.sizes] if args.sizes else SIZES
    print(f"# python bench/ab_env.py {args.a!r} {args.b!r} --models {args.models} "
          f"--rounds {args.rounds}; load {os.getloadavg()[0]:.1f}", flush=True)
    procs = {"A": start(args.a), "B": start(args.b)}
    rows = []
    try:
        for model in args.models.split(","):
            for size in sizes:
                first = {k: ask(p, model=model, size=size, seconds=0.0, grads=True)
                         for k, p in procs.items()}
                diff = max(float(np.max(np.abs(np.subtract(first["A"]["grads"][k],
                                                           first["B"]["grads"][k])))
                                 / np.max(np.abs(first["A"]["grads"][k])))
                           for k in first["A"]["grads"])
                ms = {"A": [], "B": []}
                for r in range(args.rounds):
                    for k in ("AB" if r % 2 == 0 else "BA"):
                        ms[k].append(ask(procs[k], model=model, size=size,
                                         seconds=args.seconds, pause=args.pause)["ms"])
                a, b = (float(np.median(ms[k])) for k in "AB")
                print(f"{model:6s} {','.join(map(str, size))}: A {a:9.2f} ms  B {b:9.2f} ms  "
                      f"A/B {a / b:5.2f}  grad diff {diff:.1e}", flush=True)
                rows.append(dict(model=model, size=size, a=a, b=b, diff=diff))
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()
    print(f"# load at end {os.getloadavg()[0]:.1f}")
    return rows


if __name__ == "__main__":
    main()
