"""Check a generated module's gradients against central finite differences.

The check ``bpttgen check`` and the demo run (tier 2 of DESIGN.md, on a user's
model): float64, tiny sizes, random parameters, initial states, a mask and L2, so
every term of the loss is exercised. Every algorithm that theory says computes
the full gradient is compared with the same finite differences: bptt, naive,
tbptt with k1 = k2 = T, epochwise, checkpoint (and rtrl where the module has them).
"""

from dataclasses import dataclass

import numpy as np

TOLERANCE = 1e-6  # max relative error in float64 (central differences, eps 1e-6)
EXACT_ALGORITHMS = ("bptt", "naive", "tbptt", "epochwise", "checkpoint", "rtrl")
#: Options making each algorithm compute the full gradient (checkpoint: segments of 2
#: steps and 1 snapshot, so the binomial schedule recomputes and a segment is short).
EXACT_OPTIONS = {"tbptt": lambda T: dict(k1=T, k2=T),
                 "checkpoint": lambda T: dict(segment=2, snapshots=1)}


@dataclass
class Row:
    param: str
    errors: dict  # algorithm -> max relative error

    @property
    def worst(self):
        return max(self.errors.values())

    @property
    def passed(self):
        return self.worst < TOLERANCE


def max_relative_error(a, b):
    """max |a - b| / max(|a|, |b|, 1e-3): relative where the gradient is large,
    absolute (scaled by 1e-3) where both are near zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-3)
    return float(np.max(np.abs(a - b) / denom)) if a.size else 0.0


def random_problem(module, size=3, T=5, B=2, seed=0):
    """params, x, targets, state0, mask in float64 for tiny sizes (each size a
    little different, so a transposed index cannot hide)."""
    rng = np.random.default_rng(seed)
    sizes = {s: size + (i % 2) for i, s in enumerate(module.SIZES)}
    spec = module.SPEC
    params = {name: rng.normal(0, 0.5, [sizes[s] for s in shape])
              for name, shape in spec["params"].items()}
    if spec.get("tokens"):  # integer tokens: nothing to perturb, every token drawn
        ((_, vocab),) = spec["inputs"]
        x = rng.integers(0, sizes[vocab], (T, B))
    else:  # several inputs side by side
        x = rng.normal(0, 1, (T, B, sum(sizes[size] for _, size in spec["inputs"])))
    O = sizes[spec["output"][1]]
    if spec["target"] == "index":
        targets = rng.integers(0, O, (T, B))
    else:
        targets = rng.uniform(0, 1, (T, B, O))
    state0 = {name: rng.normal(0, 0.5, (B, sizes[size_name]))
              for name, size_name in spec["states"].items()}
    mask = rng.uniform(0.5, 1.5, (T, B))
    mask[1, 0] = 0  # a masked-out step
    return params, x, targets, state0, mask


def finite_difference(loss_fn, params, eps=1e-6):
    """Central differences of loss_fn(params) for every parameter element."""
    grads = {}
    for name, value in params.items():
        g = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            orig = value[idx]
            value[idx] = orig + eps
            up = loss_fn(params)
            value[idx] = orig - eps
            down = loss_fn(params)
            value[idx] = orig
            g[idx] = (up - down) / (2 * eps)
        grads[name] = g
    return grads


def algorithms(module):
    """The algorithms of ``module`` that must give the full gradient."""
    return [a for a in EXACT_ALGORITHMS if a in module.ALGORITHMS]


def check(module, *, size=3, T=5, B=2, seed=0, l2=0.05, progress=None):
    """[Row per parameter]: max relative error of each algorithm's gradient
    against finite differences. ``progress(algorithm)`` is called as each ends."""
    params, x, targets, state0, mask = random_problem(module, size, T, B, seed)
    kw = dict(state0=state0, mask=mask, l2=l2)
    fd = finite_difference(lambda p: module.loss_and_grads(p, x, targets, **kw)[0], params)
    rows = {name: Row(name, {}) for name in params}
    for algorithm in algorithms(module):
        extra = EXACT_OPTIONS[algorithm](T) if algorithm in EXACT_OPTIONS else {}
        _, grads = module.loss_and_grads(params, x, targets, algorithm=algorithm, **kw,
                                         **extra)
        for name in params:
            rows[name].errors[algorithm] = max_relative_error(grads[name], fd[name])
        if progress:
            progress(algorithm)
    return list(rows.values())


def format_table(rows):
    """The check as a text table: parameter, each algorithm's error, pass/FAIL."""
    algs = list(rows[0].errors) if rows else []
    header = ["parameter"] + [f"{a} rel.err" for a in algs] + ["result"]
    body = [[r.param] + [f"{r.errors[a]:.1e}" for a in algs] +
            ["pass" if r.passed else "FAIL"] for r in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
             for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
