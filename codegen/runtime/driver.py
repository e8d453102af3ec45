"""The half of a generated CPU module that is the same for every model, written once.

A generated module (generated/<model>.py) holds what its derivation decides: the
@njit kernels, its SPEC, its work arrays' names and shapes, its product groups. A
call does the rest the same way for every model, here: check the arguments, fill
the workspace, choose the algorithm (one fused BPTT call, backward windows, ARTBP's
carry factors, RTRL's sensitivities), take each weight's rows of its group's stacked
gradient, add L2. The module's public functions are the methods of its ``Model``.

Every kernel takes one tuple of arrays and sizes (``args``, names in kernel order)
instead of dozens of arguments: Numba unpacks it at no cost, and its dispatcher types
a tuple about as fast as separate arguments. A module has one entry point for all
but RTRL, ``_run(stages, t_hi, t_lo, targets, weights, scale, y, args)``, which runs
the phases whose bits ``stages`` holds (calls.STATES, ... in the order they run).
"""

import functools
import math
import operator

import numpy as np

from . import calls, checkpoint, online, split
from .calls import (BACKWARD, BACKWARD_REVERSE, EVERY_STAGE, FORWARD_AND_LOSS, GRADIENTS, LOSS,
                    READOUT, STATES)


#: The workspace's entry of the gradients' places: (first views, views that add).
_GRADIENTS = "(gradients)"


class Model:
    """The driver of one generated CPU module; its arguments are the module's layout.

    name, spec    the module's NAME and SPEC
    args          the names of the tuple every kernel takes, in its order
    shapes        shapes(T, B, *sizes in SPEC order) -> {work array: shape}
    run           the module's _run (the stages above)
    rtrl_kernel   its RTRL kernel, or None
    inputs        the kernels' names of the inputs, each (T*B, its size), in SPEC order
    output        (the output z's array, its adjoint's): the loss kernel's
    states        {state: its array}, (T+1)*B rows, s_(t-1) at row t*B + b (a reverse
                  state, SPEC["reverse"]: s_(t+1) at row (t+1)*B + b, state0 at T*B)
    adjoints      {state: its adjoint's array (like the state's), or None}
    vectors       {vector parameter: its gradient's array}
    groups        ((stacked weights, their gradient, member weights), ...) per product
    transposed    ((stacked weights, their transposed copy), ...) of each product in a
                  time loop: the copy is given where the weights are small
                  (calls.SMALL_WEIGHTS), an empty array where they are not
    zeros, ones   work arrays a call starts with zeroed, filled with ones
    carry         the array of ARTBP's per-step factors (ones: plain BPTT)
    window_local  (adjoint, (T+1)*B rows, summed over windows): private to a window
    l2            l2(w, l2) -> (penalty of w summed, its gradient), as derived
    rtrl          (rtrl_directions, tangents): tangents(*sizes) gives (state or None,
                  rows) of each tangent of the RTRL kernel, in its order; None: no
                  RTRL kernel (a model with a reverse state)
    """

    def __init__(self, name, spec, args, shapes, *, run, rtrl_kernel, inputs, output, states,
                 adjoints, vectors, groups, zeros, ones, carry, window_local, l2, rtrl,
                 transposed=()):
        self.name, self.spec, self.args, self.shapes = name, spec, args, shapes
        self.run_kernel, self.rtrl_kernel = run, rtrl_kernel
        self.inputs, self.output, self.states, self.vectors = inputs, output, states, vectors
        self.adjoints = adjoints
        self.groups, self.window_local, self.l2 = groups, window_local, l2
        self.carry = carry
        self.directions, self.tangents = rtrl or (None, None)
        self.cache = calls.ArrayCache(zeros=zeros, ones=ones)
        # Each call runs these in Python before its one kernel call: kept lean.
        self._sizes = spec["sizes"]
        self._tuple = operator.itemgetter(*args)
        # (stacked weights, the one weight of a product or the tuple of its several)
        self._stacks = tuple((stacked, weights[0] if len(weights) == 1 else weights)
                             for stacked, _, weights in groups)
        self._vectors = tuple(vectors)
        self._transposed = tuple(transposed)
        # the weights of the products inside a time loop (split.count's rule)
        looped = {stacked for stacked, _ in transposed}
        self._loop_weights = tuple(w for stacked, _, weights in groups if stacked in looped
                                   for w in weights)
        self._states = tuple(states.items())
        self._reverse = frozenset(spec.get("reverse", ()))
        self._output_index = args.index(output[0])  # a float array of the call's dtype
        self._placeholders = {}

    def run(self, stages, args, t_hi=0, t_lo=0, targets=None, weights=None, scale=0.0,
            y=None):
        """The module's _run: the phases in ``stages`` on the workspace tuple ``args``.
        Only LOSS reads targets, weights, scale and y; a call without them passes empty
        arrays of their types, so every call has the one signature (one compile)."""
        if targets is None:
            dtype = args[self._output_index].dtype
            if dtype not in self._placeholders:
                index = self.spec["target"] == "index"
                self._placeholders[dtype] = (
                    np.zeros(0, np.int64) if index else np.zeros((0, 0), dtype),
                    np.zeros(0, dtype), np.zeros((0, 0), dtype))
            targets, weights, y = self._placeholders[dtype]
        return self.run_kernel(stages, t_hi, t_lo, targets, weights, scale, y, args)

    # -- the workspace --------------------------------------------------------------
    def _allocate(self, T, B, dtype, *dims):
        """The work arrays of one call of these sizes, the sizes themselves and, under
        _GRADIENTS, where the gradients are (see _gradients)."""
        size = dict(zip(self._sizes, dims))
        ws = dict(T=T, B=B, TB=T * B, **size)
        ws.update((name, (np.ones if name in self.cache.ones else
                          np.zeros if name in self.cache.zeros else np.empty)(shape, dtype))
                  for name, shape in self.shapes(T, B, *dims).items())
        rows = calls.stacked_rows([(gradient, weights) for _, gradient, weights in self.groups],
                                  lambda w: size[self.spec["params"][w][0]])
        first = [(w, ws[g][lo:hi]) for g, w, lo, hi, one in rows if one]
        first += [(p, ws[gradient]) for p, gradient in self.vectors.items()]
        ws[_GRADIENTS] = (tuple(first), tuple((w, ws[g][lo:hi])
                                              for g, w, lo, hi, one in rows if not one))
        return ws

    def workspace(self, sizes, T, B, dtype, params, x, state0):
        """{name: array or size} of one call: the sizes, the input, the weights of each
        product stacked row-wise (one GEMM per group), the vector parameters and the
        work arrays (reused from this thread's last call of the same sizes)."""
        dims = tuple(map(sizes.__getitem__, self._sizes))
        # A copy: the cache keeps no reference to this call's arguments.
        ws = dict(self.cache.get((T, B, np.dtype(dtype), *dims), self._allocate))
        ws.update(zip(self.inputs, calls.input_columns(self.spec, sizes,
                                                     calls.input_rows(self.spec, x))))
        for stacked, weights in self._stacks:
            ws[stacked] = np.ascontiguousarray(params[weights]) if type(weights) is str \
                else np.concatenate([params[w] for w in weights])
        for stacked, transposed in self._transposed:
            w = ws[stacked]
            ws[transposed] = (np.ascontiguousarray(w.T) if w.size <= calls.SMALL_WEIGHTS
                              else np.empty((0, 0), w.dtype))
        for p in self._vectors:
            ws[p] = np.ascontiguousarray(params[p])
        for s, array in self._states:
            # a reverse state's initial value is its value at t = T, after the last row
            rows = slice(T * B, None) if s in self._reverse else slice(0, B)
            ws[array][rows] = 0 if state0 is None else state0[s]
        return ws

    def free_workspace(self):
        """Free the work arrays kept from the last calls: this thread's and those of
        the threads a split call ran on (split.py)."""
        self.cache.clear()

    def _final_states(self, ws, T, B):
        """Each state at the end of its run: t = T-1, or t = 0 for a reverse state."""
        return {s: ws[array][:B].copy() if s in self._reverse else ws[array][T * B:].copy()
                for s, array in self.states.items()}

    def _targets(self, sizes, T, B, targets=None, dtype=None):
        """Targets as the loss kernel reads them, (T*B,) or (T*B, O); None: zeros (a
        forward call computes predictions only)."""
        O = sizes[self.spec["output"][1]]
        index = self.spec["target"] == "index"
        shape = (T * B,) if index else (T * B, O)
        if targets is None:
            return np.zeros(shape, np.int64 if index else dtype)
        # int64 classes whatever integer type they came as: _run's one signature
        return np.ascontiguousarray(targets.reshape(shape), np.int64 if index else None)

    # -- memory ---------------------------------------------------------------------
    def _call_bytes(self, sizes, T, B, itemsize):
        """Bytes one call of T steps allocates: its work arrays, the stacked weights,
        predictions, loss weights, and the gradients handed back (twice: summed, copied)."""
        dims = tuple(sizes[s] for s in self._sizes)
        arrays = sum(math.prod(shape) for shape in self.shapes(T, B, *dims).values())
        params = sum(math.prod(sizes[d] for d in shape)
                     for shape in self.spec["params"].values())
        per_row = sizes[self.spec["output"][1]] + 1
        return itemsize * (arrays + 3 * params + T * B * per_row)

    def _checkpoint_plan(self, sizes, T, B, itemsize, memory_limit=None, snapshots=None,
                         segment=None):
        one, two = (self._call_bytes(sizes, t, B, itemsize) for t in (1, 2))
        step = two - one + B * calls.input_bytes(self.spec, sizes, itemsize)  # + x's buffer
        state = itemsize * B * sum(sizes[size] for size in self.spec["states"].values())
        return checkpoint.plan(T, step, state, one - (two - one), memory_limit=memory_limit,
                               snapshots=snapshots, segment=segment)

    def memory(self, sizes, T, B, dtype=np.float32, algorithm="bptt", *, snapshots=None,
               segment=None, memory_limit=None):
        """Bytes a loss_and_grads call of T steps and B sequences will allocate, before it
        runs (the arguments' own arrays not counted). sizes: {name: int}. For
        "checkpoint", the plan it would choose (see checkpoint.plan)."""
        calls.check_direction(self.name, self.spec, algorithm)
        itemsize = np.dtype(dtype).itemsize
        if algorithm == "checkpoint":
            return self._checkpoint_plan(sizes, T, B, itemsize, memory_limit, snapshots,
                                         segment).bytes
        need = self._call_bytes(sizes, T, B, itemsize)
        if algorithm in ("naive", "tbptt"):  # a window's private adjoints, and their sums
            shapes = self.shapes(T, B, *(sizes[s] for s in self._sizes))
            need += itemsize * sum(math.prod(shapes[name]) * (2 if summed else 1)
                                   for name, _, summed in self.window_local)
        if algorithm == "rtrl":
            NP, _ = self.directions(sizes)
            rows = sum(r for _, r in self.tangents(*[sizes[s] for s in self._sizes]))
            need += online.rtrl_memory(B, NP, rows, itemsize)
        return need

    def _check_memory(self, algorithm, sizes, T, B, dtype, memory_limit):
        """Refuse, before anything is allocated, a call over memory_limit bytes, with
        the figure and the checkpointed plan that fits."""
        calls.check_memory_limit(memory_limit)
        need = self.memory(sizes, T, B, dtype, algorithm)
        if need <= memory_limit:
            return
        itemsize = np.dtype(dtype).itemsize
        try:
            fits = (f"algorithm='checkpoint' computes the same gradient within it: "
                    f"{self._checkpoint_plan(sizes, T, B, itemsize, memory_limit)!r}")
        except ValueError as e:
            fits = f"no checkpointed schedule fits either ({e})"
        raise ValueError(f"algorithm={algorithm!r} on {self.name} with T={T}, B={B} needs "
                         f"about {calls.bytes_text(need)}, more than memory_limit="
                         f"{calls.bytes_text(int(memory_limit))}; {fits}")

    # -- results ----------------------------------------------------------------------
    def _gradients(self, ws):
        """The gradients in the workspace, keyed like params: views of each weight's rows
        of its group's stacked gradient (a weight in several products sums its rows of
        each), the vector parameters' sums; the views are made once per workspace."""
        first, more = ws[_GRADIENTS]
        grads = dict(first)
        for w, part in more:
            grads[w] = grads[w] + part
        return grads

    def _l2_terms(self, params, l2):
        """(name, penalty l2/2 ||W||^2, its gradient) of each weight matrix, in the
        order the loss adds them (so loss() and loss_and_grads() give the same float)."""
        if not l2:
            return []
        return [(name, *self.l2(params[name], l2))
                for name, role in self.spec["roles"].items() if role == "weight"]

    def _with_l2(self, params, loss, grads, l2):
        """(loss, grads) with the penalty l2/2 sum ||W||^2 of the weight matrices added."""
        for name, penalty, gradient in self._l2_terms(params, l2):
            loss += penalty
            grads[name] = grads[name] + gradient
        # Copies: the workspace the gradients live in is reused by the next call.
        return float(loss), {name: np.array(grads[name]) for name in self.spec["params"]}

    def _with_l2_penalty(self, params, loss, l2):
        """The loss alone with the penalty added as _with_l2 adds it."""
        for _, penalty, _ in self._l2_terms(params, l2):
            loss += penalty
        return float(loss)

    # -- the public functions of the module -------------------------------------------
    def init_params(self, sizes, *, seed=0, dtype=np.float32):
        """Parameters for sizes {name: int} (or a tuple in SIZES order): weights uniform
        in +-1/sqrt(fan_in), biases zero."""
        return calls.init_params(self.spec, sizes, seed=seed, dtype=dtype)

    def forward(self, params, x, state0=None, *, threads=None):
        """Predictions y (T, B, output size) and the final states {name: (B, size)}.

        threads: the batch split into this many pieces, each run by a thread of its own
        (1: never); None: $BPTTGEN_THREADS where set, else decided by sizes as for
        loss_and_grads, the forward counting a third of a call's work (split.count).
        Each sequence's numbers are its own, split or not, up to the BLAS's rounding."""
        x = calls.pack_inputs(self.spec, x)
        sizes, T, B, dtype = calls.check_call(self.spec, params, x, state0=state0)
        n = self.pieces(params, T, B, dtype, threads=threads, forward=True)
        if n == 1:
            return self._forward(params, x, state0, sizes, T, B, dtype)
        results = self._over_rows(n, B, lambda lo, hi: self._forward(
            params, x[:, lo:hi], split.rows(state0, lo, hi), sizes, T, hi - lo, dtype))
        return (np.concatenate([y for y, _ in results], axis=1),
                {s: np.concatenate([final[s] for _, final in results]) for s in self.states})

    def _over_rows(self, n, B, piece):
        """[piece(lo, hi) for the rows lo..hi-1 of each of n pieces of the batch's B]:
        here for n = 1, else each on a thread of its own (split.py)."""
        if n == 1:
            return [piece(0, B)]
        return split.run([functools.partial(piece, lo, hi) for lo, hi in split.pieces(B, n)])

    def _forward(self, params, x, state0, sizes, T, B, dtype):
        """forward on the whole batch, in this thread: the arguments checked."""
        ws = self.workspace(sizes, T, B, dtype, params, np.ascontiguousarray(x), state0)
        O = sizes[self.spec["output"][1]]
        y = np.empty((T * B, O), dtype)
        # the loss phase with zero weights: the predictions y alone
        self.run(STATES | READOUT | LOSS, self._tuple(ws), targets=self._targets(
            sizes, T, B, dtype=dtype), weights=np.zeros(T * B, dtype), y=y)
        return y.reshape(T, B, O), self._final_states(ws, T, B)

    def loss(self, params, x, targets, *, state0=None, mask=None, l2=0.0, threads=None,
             memory_limit=None):
        """The loss of loss_and_grads (its arguments, weights and L2) without the
        gradients: the forward and the loss phase, 0.35-0.6 of loss_and_grads' time
        (BENCHMARKS.md). For a held-out loss. threads: as for forward().

        memory_limit (bytes): the sequence is run in stretches of as many steps as fit
        (all, where they do), each from the states the last one ended in (the same loss
        up to the order of its sum), not split over threads; x, targets, mask may then
        be arrays read by slices, such as np.memmap. A model with a reverse state needs
        the whole sequence at once: refused where it does not fit."""
        x = calls.pack_inputs(self.spec, x)
        calls.check_memory_limit(memory_limit)
        if memory_limit is not None:
            sizes, T, B, dtype = self._check_by_slices(params, x, targets, state0, mask, l2)
            steps = self._steps_within(sizes, T, B, dtype, memory_limit)
            return self._loss_in_stretches(params, x, targets, state0, mask, l2, sizes, T, B,
                                           dtype, steps)
        sizes, T, B, dtype = calls.check_call(self.spec, params, x, targets, state0, mask,
                                              l2=l2)
        weights, total = calls.loss_weights(self.spec, T, B, mask, dtype)
        weights = weights.reshape(T, B)
        n = self.pieces(params, T, B, dtype, threads=threads, forward=True)
        sums = self._over_rows(n, B, lambda lo, hi: self._loss_sum(
            params, x[:, lo:hi], targets[:, lo:hi], split.rows(state0, lo, hi),
            weights[:, lo:hi], sizes, T, hi - lo, dtype)[0])
        return self._with_l2_penalty(params, sum(sums) / total, l2)

    def _check_by_slices(self, params, x, targets, state0, mask, l2):
        """(sizes, T, B, dtype) of a call whose x, targets and mask are read by slices:
        their shapes, and the parameters, states and L2 checked with the first step
        (each later slice is checked as it is read)."""
        T = checkpoint.check_sequence(self.spec, x, targets, mask)
        first = slice(0, min(T, 1))
        sizes, _, B, dtype = calls.check_call(
            self.spec, params, np.asarray(x[first]), np.asarray(targets[first]), state0,
            None if mask is None else np.asarray(mask[first]), l2=l2)
        return sizes, T, B, dtype

    def _loss_sum(self, params, x, targets, state0, weights, sizes, T, B, dtype):
        """(the weighted sum of the losses of a call's T steps, its final states), in
        this thread: the arguments checked, weights (T, B)."""
        ws = self.workspace(sizes, T, B, dtype, params, np.ascontiguousarray(x), state0)
        y = np.empty((T * B, sizes[self.spec["output"][1]]), dtype)
        total = self.run(STATES | READOUT | LOSS, self._tuple(ws),
                         targets=self._targets(sizes, T, B, np.asarray(targets)),
                         weights=np.ascontiguousarray(weights).reshape(-1), scale=0.0, y=y)
        return total, self._final_states(ws, T, B)

    def _steps_within(self, sizes, T, B, dtype, memory_limit):
        """The most steps (at most T) whose loss() call allocates at most memory_limit
        bytes; ValueError if not even one step's does."""
        itemsize = np.dtype(dtype).itemsize
        one, two = (self._call_bytes(sizes, t, B, itemsize) for t in (1, 2))
        steps = min(T, int((memory_limit - one) // (two - one)) + 1)
        if steps < 1:
            raise ValueError(f"loss() on {self.name} with B={B} needs about "
                             f"{calls.bytes_text(one)} for a single step, more than "
                             f"memory_limit={calls.bytes_text(int(memory_limit))}")
        return steps

    def _loss_in_stretches(self, params, x, targets, state0, mask, l2, sizes, T, B, dtype,
                           steps):
        """loss() over stretches of ``steps`` steps (one, if they are T), each read by
        slices, checked as it is read and run from the last one's final states."""
        if self._reverse and steps < T:
            raise ValueError(f"loss() on {self.name} needs the whole sequence at once (its "
                             f"state(s) {sorted(self._reverse)} run in reverse), which is "
                             f"more than memory_limit allows: {steps} of {T} steps fit")
        weights, total = checkpoint.segment_weights(self.spec, T, B, mask, dtype)
        state, loss = state0, 0.0
        for lo in range(0, T, steps):
            hi = min(T, lo + steps)
            xs, ts = np.asarray(x[lo:hi]), np.asarray(targets[lo:hi])
            calls.check_data(self.spec, sizes, dtype, xs, ts, None,
                             None if mask is None else np.asarray(mask[lo:hi]))
            part, state = self._loss_sum(params, xs, ts, state, weights(lo, hi), sizes,
                                         hi - lo, B, dtype)
            loss += part
        return self._with_l2_penalty(params, loss / total, l2)

    def loss_and_grads(self, params, x, targets, *, state0=None, algorithm="bptt", k1=None,
                       k2=None, mask=None, l2=0.0, c=None, seed=None, truncate=None,
                       memory_limit=None, snapshots=None, segment=None, threads=None):
        """Loss sum_tb w l / sum_tb w (+ l2/2 sum ||W||^2) and its gradients, keyed like
        params.

        x: (T, B, input size), several inputs side by side or a dict of them; targets: (T, B) integer classes or (T, B, output size)
        floats, as SPEC["target"] says; state0: {state: (B, size)}; algorithm: "bptt"
        (accumulated, O(T)), "naive" (O(T^2)), "tbptt" (k1, k2: every k1 steps
        backpropagate over the last k2; returns the sum of the truncated gradients),
        "epochwise" (full BPTT over the sequence, seed 001), "rtrl" (forward-mode
        sensitivities, seed 001, see rtrl(); refused when they would need more than
        memory_limit bytes), "artbp" (seed 003: the recurrence cut at each step with
        probability c, a number or a schedule of length T, and the adjoint reweighted by
        1/(1 - c_t) where it is not, an unbiased estimate of the bptt gradient; the cuts
        drawn from seed, an int or a numpy Generator, or given as truncate, bool (T,)),
        "checkpoint" (bptt's gradient in bounded memory: only some states kept, the
        trajectory recomputed segment by segment; segment steps each, snapshots kept,
        or the fastest plan within memory_limit; x, targets, mask may then be any
        arrays read by slices x[a:b], such as np.memmap; see checkpoint.py).
        memory_limit (bytes): every algorithm refuses a call that would allocate more
        (memory() says how much, before it runs), naming the checkpointed plan that fits.
        threads: the batch split into this many pieces, each run by a thread of its own
        (bptt, epochwise, naive, tbptt; 1: never); None: $BPTTGEN_THREADS where set, else
        decided by sizes (split.count).
        """
        if targets is None:
            raise TypeError("loss_and_grads needs targets; use forward(params, x) for "
                            "predictions")
        x = calls.pack_inputs(self.spec, x)
        online.check_options(algorithm, k1=k1, k2=k2, c=c, seed=seed, truncate=truncate,
                             memory_limit=memory_limit, snapshots=snapshots, segment=segment)
        calls.check_direction(self.name, self.spec, algorithm)
        if algorithm == "checkpoint":
            return self._checkpointed(params, x, targets, state0, mask, l2, memory_limit,
                                      snapshots, segment)
        sizes, T, B, dtype = calls.check_call(self.spec, params, x, targets, state0, mask,
                                              l2=l2)
        if memory_limit is not None and algorithm != "rtrl":
            self._check_memory(algorithm, sizes, T, B, dtype, memory_limit)
        if algorithm == "rtrl":
            calls.loss_weights(self.spec, T, B, mask, dtype)  # refuses a mask without loss
            return self.rtrl(params, x, targets, state0=state0, mask=mask, l2=l2,
                             memory_limit=memory_limit)[:2]
        pieces = self.pieces(params, T, B, dtype, algorithm, threads)
        if pieces > 1:
            return self._split(pieces, params, x, targets, state0, mask, l2, algorithm, k1,
                               k2, sizes, T, B, dtype)
        return self._whole(params, x, targets, state0, mask, l2, algorithm, k1, k2, c, seed,
                           truncate, sizes, T, B, dtype)

    def pieces(self, params, T, B, dtype, algorithm="bptt", threads=None, forward=False):
        """How many pieces a loss_and_grads call (or with ``forward``, a forward call)
        of these parameters and sizes splits its batch into (split.count: 1, not split).
        A forward multiplies each parameter once per row and step, a third of what a
        call with its gradients does: its work counts a third."""
        loop_bytes = sum(params[w].size for w in self._loop_weights) * np.dtype(dtype).itemsize
        parameters = sum(params[p].size for p in self.spec["params"])
        return split.count(threads, algorithm, T, B, loop_bytes,
                           parameters // 3 if forward else parameters)

    def _split(self, n, params, x, targets, state0, mask, l2, algorithm, k1, k2, sizes, T, B,
               dtype):
        """loss_and_grads with the batch split into n pieces, one thread each (split.py);
        a piece without loss terms (masked) is left out."""
        calls.windows(algorithm, T, k1, k2)  # checks k1, k2 before any thread starts
        pieces, weights = [], []
        for lo, hi in split.pieces(B, n):
            m = None if mask is None else mask[:, lo:hi]
            _, w = calls.loss_weights(self.spec, T, hi - lo, m, dtype, allow_empty=True)
            if w > 0:
                pieces.append((lo, hi, m))
                weights.append(w)
        if not pieces:
            calls.loss_weights(self.spec, T, B, mask, dtype)  # refuses: no loss term

        def piece(lo, hi, m):
            return self._whole(params, x[:, lo:hi], targets[:, lo:hi],
                               split.rows(state0, lo, hi), m, 0.0, algorithm, k1, k2, None,
                               None, None, sizes, T, hi - lo, dtype)

        results = split.run([lambda p=p: piece(*p) for p in pieces])
        loss, grads = split.combine(weights, results)
        return self._with_l2(params, loss, grads, l2)

    def _whole(self, params, x, targets, state0, mask, l2, algorithm, k1, k2, c, seed,
               truncate, sizes, T, B, dtype):
        """loss_and_grads on the whole batch, in this thread: the arguments checked."""
        plan = None if algorithm == "artbp" else calls.windows(algorithm, T, k1, k2)
        weights, total = calls.loss_weights(self.spec, T, B, mask, dtype)
        ws = self.workspace(sizes, T, B, dtype, params, np.ascontiguousarray(x), state0)
        if algorithm == "artbp":
            ws[self.carry][:] = online.artbp_carry(T, c, seed, truncate, dtype)
        args = self._tuple(ws)
        y = np.empty((T * B, sizes[self.spec["output"][1]]), dtype)
        flat_targets = self._targets(sizes, T, B, targets)
        if plan is None:
            loss = self.run(EVERY_STAGE, args, T - 1, 0, flat_targets, weights, 1.0 / total,
                            y) / total
        else:
            loss = self.run(FORWARD_AND_LOSS, args, targets=flat_targets, weights=weights,
                            scale=1.0 / total, y=y) / total
            calls.backward_windows(lambda hi, lo, a: self.run(BACKWARD, a, hi, lo), self.args,
                                   ws, T, B, plan, self.window_local)
            if self._reverse:  # a bidirectional layer's second direction
                calls.reverse_windows(lambda lo, hi, a: self.run(BACKWARD_REVERSE, a, hi, lo),
                                      self.args, ws, T, B, plan, self.window_local)
            self.run(GRADIENTS, args)
        return self._with_l2(params, loss, self._gradients(ws), l2)

    def _checkpointed(self, params, x, targets, state0, mask, l2, memory_limit, snapshots,
                      segment):
        """Checkpointed BPTT (checkpoint.py). The arguments are checked one segment at a
        time as they are read, the whole of them never being in memory at once."""
        x = calls.pack_inputs(self.spec, x)
        sizes, T, B, dtype = self._check_by_slices(params, x, targets, state0, mask, l2)
        checkpoint.check_options(memory_limit, snapshots, segment)
        chosen = self._checkpoint_plan(sizes, T, B, np.dtype(dtype).itemsize, memory_limit,
                                       snapshots, segment)

        def check(xs, ts, ms):
            calls.check_data(self.spec, sizes, dtype, xs, ts, None, ms)

        loss, grads = checkpoint.run(self, params, x, targets, mask, state0, sizes, T, B,
                                     dtype, chosen, check)
        return self._with_l2(params, loss, grads, l2)

    def rtrl(self, params, x, targets, *, state0=None, sensitivities=None, mask=None, l2=0.0,
             memory_limit=None):
        """Real-time recurrent learning (seed 001): the loss and its gradients by
        forward-mode sensitivities S_t = J_t S_(t-1) + ds_t/dtheta, and what an online
        learner carries to its next call. Returns (loss, grads, final states, final
        sensitivities).

        sensitivities: {state: (size, B, NP)} dS/dtheta entering x along
        rtrl_directions (None: zeros, as for a given state0); the same form is returned.
        A mask that selects no loss term is allowed here (loss and gradients 0, but for
        l2): the states and sensitivities still advance. Memory O(B H NP), refused above
        memory_limit bytes (default bpttgen.codegen.runtime.online.RTRL_MEMORY_LIMIT);
        cost O(B H^2 NP) per step.
        """
        if targets is None:
            raise TypeError("rtrl needs targets; use forward(params, x) for predictions")
        x = calls.pack_inputs(self.spec, x)
        calls.check_direction(self.name, self.spec, "rtrl")
        sizes, T, B, dtype = calls.check_call(self.spec, params, x, targets, state0, mask,
                                              l2=l2)
        NP, directions = self.directions(sizes)
        tangents = self.tangents(*[sizes[s] for s in self.spec["sizes"]])
        online.check_rtrl_memory(self.name, B, NP, sum(rows for _, rows in tangents), dtype,
                                 memory_limit)
        weights, total = calls.loss_weights(self.spec, T, B, mask, dtype, allow_empty=True)
        sens = online.sensitivity_arrays(self.spec["states"], sizes, B, NP, dtype,
                                         sensitivities)
        ws = self.workspace(sizes, T, B, dtype, params, np.ascontiguousarray(x), state0)
        args = self._tuple(ws)
        y = np.empty((T * B, sizes[self.spec["output"][1]]), dtype)
        scale = 1.0 / total if total > 0 else 0.0
        loss = self.run(FORWARD_AND_LOSS, args, targets=self._targets(sizes, T, B, targets),
                        weights=weights, scale=scale, y=y) * scale
        grad = np.zeros(NP, dtype)
        self.rtrl_kernel(grad, tuple([sens[s] if s is not None else
                                      np.empty((rows, B * NP), dtype)
                                      for s, rows in tangents]), args)
        # What the post phase wrote into the loop's adjoints (a state's, or a loop node's
        # that the readout reads) flowed into grad through the tangents above; zeroed, so
        # that a product sharing such an array adds nothing twice below.
        for name, _, _ in self.window_local:
            ws[name][:] = 0
        # paths from a pre node straight to the readout, and the readout's weights (the
        # loop's adjoints are zero)
        self.run(GRADIENTS, args)
        grads = self._gradients(ws)
        for name, first, count, shape in directions:
            grads[name] = grads[name] + grad[first:first + count].reshape(shape)
        loss, grads = self._with_l2(params, loss, grads, l2)
        out = {s: a.reshape(a.shape[0], B, NP) for s, a in sens.items()}
        return loss, grads, self._final_states(ws, T, B), out
