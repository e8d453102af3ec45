"""Run-time support of the online algorithms of the generated CPU modules: RTRL, ARTBP.

Next to calls.py at the end of the data flow (NumPy only, nothing from derive/):
the generated module holds the kernels (the RTRL kernel printed by codegen/rtrl.py,
the backward kernel with its per-step carry factor), this module what is the same
for every model: the ARTBP draws and factors, the RTRL memory estimate, and the
Trainer's online loops for both.

* RTRL (seed 001): forward-mode sensitivities S_t = ds_t/dtheta, exact at fixed
  weights; O(B H NP) memory, so ``loss_and_grads`` refuses a call whose
  sensitivities would not fit under ``RTRL_MEMORY_LIMIT`` (or ``memory_limit=``).
* ARTBP (Tallec & Ollivier 2017, "Unbiasing Truncated Backpropagation Through
  Time"; seed 003): at each step t the recurrence is cut with probability c_t
  (eps_t = 1); where it is not cut, the adjoint flowing from step t to t-1 is
  multiplied by 1/(1 - c_t). E[(1 - eps_t)/(1 - c_t)] = 1 and the draws are
  independent of the trajectory, so every product of factors along a path has
  mean 1 and the gradient estimate is unbiased.
"""

import numpy as np

from .calls import ALGORITHMS as REVERSE
from .calls import bytes_text, check_memory_limit, loss_weights

ALGORITHMS = ("rtrl", "artbp")

#: Default bound, in bytes, on the sensitivities RTRL keeps (memory_limit= overrides).
RTRL_MEMORY_LIMIT = 2 * 1024 ** 3



# -- options --------------------------------------------------------------------

def check_options(algorithm, *, k1=None, k2=None, c=None, seed=None, truncate=None,
                  memory_limit=None, snapshots=None, segment=None):
    """Refuse an unknown algorithm and keyword arguments that do not apply to it."""
    known = REVERSE + ("checkpoint",) + ALGORITHMS
    if algorithm not in known:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {known}")
    artbp = {"c": c, "seed": seed, "truncate": truncate}
    given = [k for k, v in artbp.items() if v is not None]
    if given and algorithm != "artbp":
        raise ValueError(f"{'/'.join(given)} apply to algorithm='artbp', not {algorithm!r}")
    given = [k for k, v in (("snapshots", snapshots), ("segment", segment)) if v is not None]
    if given and algorithm != "checkpoint":
        raise ValueError(f"{'/'.join(given)} apply to algorithm='checkpoint', not "
                         f"{algorithm!r}")
    if algorithm in ALGORITHMS and (k1 is not None or k2 is not None):
        raise ValueError(f"k1/k2 apply to algorithm='tbptt', not {algorithm!r}")
    if algorithm == "artbp" and c is None:
        raise ValueError("algorithm='artbp' needs c, the truncation probability: a number "
                         "in [0, 1] or a per-step schedule of length T")


def truncation_schedule(c, T):
    """c_t for t = 0 .. T-1 as a float64 array: a constant or a schedule of length T.

    >>> truncation_schedule(0.25, 3).tolist()
    [0.25, 0.25, 0.25]
    """
    if isinstance(c, (int, float, np.integer, np.floating)) and not isinstance(c, bool):
        c = np.full(T, float(c))
    elif isinstance(c, (list, tuple, np.ndarray)):
        c = np.asarray(c, dtype=np.float64)
        if c.shape != (T,):
            raise ValueError(f"the truncation schedule c must have shape (T,) = ({T},), got "
                             f"{c.shape}")
    else:
        raise TypeError(f"c must be a number or an array of length T, got {type(c).__name__}")
    if not np.all(np.isfinite(c)) or np.any(c < 0) or np.any(c > 1):
        raise ValueError(f"truncation probabilities c must lie in [0, 1], got {c.min()} .. "
                         f"{c.max()}")
    return c


def _generator(seed):
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.default_rng(seed)
    raise TypeError(f"seed must be an integer, a numpy Generator or None, got "
                    f"{type(seed).__name__}")


def artbp_carry(T, c, seed=None, truncate=None, dtype=np.float64):
    """The per-step factor of the adjoint flowing from step t to step t-1: 0 where
    the recurrence is cut, 1/(1 - c_t) elsewhere.

    ``truncate`` (bool, length T) gives the cuts; without it they are drawn,
    eps_t ~ Bernoulli(c_t), from ``seed`` (an int, a Generator or None). Entry 0
    multiplies the adjoint of the initial state, which no gradient reads.

    >>> artbp_carry(4, 0.5, truncate=np.array([0, 0, 1, 0], bool)).tolist()
    [2.0, 2.0, 0.0, 2.0]
    >>> artbp_carry(3, 0.0, seed=0).tolist()  # c = 0: never cut, plain BPTT
    [1.0, 1.0, 1.0]
    """
    c = truncation_schedule(c, T)
    if truncate is None:
        truncate = _generator(seed).random(T) < c
    else:
        truncate = np.asarray(truncate)
        if truncate.shape != (T,) or truncate.dtype != np.bool_:
            raise ValueError(f"truncate must be a bool array of shape (T,) = ({T},), got "
                             f"{truncate.dtype} {truncate.shape}")
        kept = ~truncate & (c >= 1)
        if np.any(kept):
            raise ValueError(f"truncate keeps step {int(np.argmax(kept))}, where c = 1 "
                             "(always cut): its factor 1/(1 - c) is infinite")
    with np.errstate(divide="ignore"):
        carry = np.where(truncate, 0.0, 1.0 / np.where(truncate, 1.0, 1.0 - c))
    return np.ascontiguousarray(carry, dtype=dtype)


# -- RTRL -----------------------------------------------------------------------

def rtrl_memory(B, NP, rows, itemsize):
    """Bytes of the RTRL sensitivities and tangents: rows x B*NP, and the gradient."""
    return itemsize * (rows * B * NP + NP)


def check_rtrl_memory(name, B, NP, rows, dtype, limit=None):
    """Raise ValueError, before anything is allocated, when the tangents RTRL keeps
    would exceed ``limit`` bytes (default RTRL_MEMORY_LIMIT)."""
    limit = RTRL_MEMORY_LIMIT if limit is None else limit
    check_memory_limit(limit)
    itemsize = np.dtype(dtype).itemsize
    need = rtrl_memory(B, NP, rows, itemsize)
    if need > limit:
        raise ValueError(
            f"algorithm='rtrl' on {name} needs about {bytes_text(need)} for its sensitivities "
            f"({rows} tangent rows x B={B} sequences x NP={NP} parameter directions x "
            f"{itemsize} bytes), more than the limit of {bytes_text(int(limit))}. RTRL keeps "
            "O(B H P) numbers: use a smaller batch or model, 'bptt', 'tbptt' or 'artbp', or "
            "raise the limit (memory_limit=bytes, or "
            "bpttgen.codegen.runtime.online.RTRL_MEMORY_LIMIT)")
    return need


def sensitivity_arrays(states, sizes, B, NP, dtype, sensitivities):
    """{state: (size, B*NP) array} of dS/dtheta entering a call: copies of the given
    {state: (size, B, NP)} arrays (the kernel overwrites them), or zeros."""
    out = {}
    if sensitivities is not None and not isinstance(sensitivities, dict):
        raise TypeError(f"sensitivities must be a dict {{state: (size, B, NP) array}}, got "
                        f"{type(sensitivities).__name__}")
    for name, size in states.items():
        shape = (sizes[size], B, NP)
        if sensitivities is None:
            out[name] = np.zeros((shape[0], B * NP), dtype)
            continue
        if name not in sensitivities:
            raise ValueError(f"sensitivities is missing the state {name!r}")
        s = sensitivities[name]
        if not isinstance(s, np.ndarray) or s.shape != shape or s.dtype != dtype:
            raise ValueError(f"sensitivities[{name!r}] must be a {np.dtype(dtype)} array of "
                             f"shape (size, B, NP) = {shape}, got "
                             f"{getattr(s, 'dtype', type(s).__name__)} "
                             f"{getattr(s, 'shape', '')}")
        out[name] = np.array(s.reshape(shape[0], B * NP), dtype=dtype, order="C")
    return out


# -- the Trainer's online loops ------------------------------------------------------

def trainer_options(algorithm, c, every):
    """Validated (c, every) of a Trainer: c for artbp, every (updates every k steps,
    default 1) for rtrl."""
    if c is not None and algorithm != "artbp":
        raise ValueError(f"c applies to algorithm='artbp', not {algorithm!r}")
    if every is not None and algorithm != "rtrl":
        raise ValueError(f"every applies to algorithm='rtrl', not {algorithm!r}")
    if algorithm == "artbp":
        if c is None:
            raise ValueError("algorithm='artbp' needs c, the truncation probability")
        if isinstance(c, (int, float, np.integer, np.floating)):
            truncation_schedule(c, 1)
    if algorithm == "rtrl":
        every = 1 if every is None else every
        if not (isinstance(every, (int, np.integer)) and every >= 1):
            raise ValueError(f"every must be a positive integer, got {every!r}")
    return c, every


def trainer_step(trainer, x, targets, mask):
    """One minibatch of online RTRL or ARTBP: the stream engine (stream.py) fed it as
    one chunk; the mean loss of its updates. RTRL: every ``every`` steps, the gradient
    of those steps' losses through the sensitivities carried from the start, an update.
    ARTBP: the minibatch's cuts drawn; at each, the stretch since the last cut
    backpropagated (reweighted by 1/(1 - c_t) inside it) and an update."""
    from .stream import Artbp, Rtrl, run_one

    T, B = x.shape[:2]
    w, _ = loss_weights(trainer.module.SPEC, T, B, mask, trainer.dtype, allow_empty=True)
    if trainer.algorithm == "rtrl":
        return run_one(Rtrl(trainer), x, targets, w.reshape(T, B))
    return run_one(Artbp(trainer), x, targets, w.reshape(T, B),
                   c=truncation_schedule(trainer.c, T))
