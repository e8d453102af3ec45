#!/usr/bin/env python
"""Tier 5 for the reduction cells, the bidirectional layer and the embedding:
PyTorch autograd agrees with the generated modules.

    python bench/torch_agreement.py            # float64, tiny sizes; exit 1 on disagreement

An independent implementation of each cell, written the way its source writes it:

* layernorm_lstm: PyTorch's fastrnns ``LayerNormLSTMCell`` (benchmarks/fastrnns/
  custom_lstms.py) with ``torch.nn.LayerNorm``'s function over the 4H gate products of the input
  and of the state and over the cell, gates chunked i, f, g, o;
* rmsnorm: ``torch.nn.RMSNorm``'s function on the Elman pre-activation, then tanh;
* bielman: ``torch.nn.RNN(bidirectional=True)`` itself, bpttgen's parameters as its
  weights (its second bias zero), the readout of its output [hf_t, hb_t]; its final
  states h_n (the reverse direction's at t = 0) against the module's too;
* embed_lstm: ``torch.nn.Embedding``'s function (bpttgen's (D, V) table transposed as
  its (V, D) weight) on integer tokens, then ``torch.nn.LSTMCell``'s equations;

each with the readout z = W_y h + b_y and softmax cross-entropy averaged over T*B
(the generated modules' loss convention with no mask). Loss and every gradient of
torch's autograd against the committed module's ``loss_and_grads`` (bptt) in float64;
bpttgen's per-gate parameters are concatenated in torch's order. torch is optional
(``pip install torch --index-url https://download.pytorch.org/whl/cpu``).
"""

import sys

import numpy as np

TOL = 1e-9


def _problem(module, sizes, T=5, B=3, seed=0):
    rng = np.random.default_rng(seed)
    params = module.init_params(sizes, seed=seed, dtype=np.float64)
    # gains and biases away from 1 and 0, so a mix-up of them cannot hide
    params = {k: v + rng.normal(0, 0.3, v.shape) for k, v in params.items()}
    x_size, out_size = module.SPEC["inputs"][0][1], module.SPEC["output"][1]
    if module.SPEC["tokens"]:  # every token drawn, some twice in a step (B = 3, V = 5)
        x = rng.integers(0, sizes[x_size], (T, B))
    else:
        x = rng.normal(0, 1, (T, B, sizes[x_size]))
    targets = rng.integers(0, sizes[out_size], (T, B))
    state0 = {s: rng.normal(0, 0.5, (B, sizes["H"])) for s in module.STATES}
    return params, x, targets, state0


def _readout_loss(torch, P, hs, targets, W="W_y"):
    z = torch.stack(hs) @ P[W].T + P["b_y"]
    return torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]),
                                             torch.from_numpy(targets).reshape(-1))


def layernorm_lstm(torch, P, x, targets, state0, H):
    gates = "ifgo"
    W_ih = torch.cat([P[f"W_{g}"] for g in gates])
    W_hh = torch.cat([P[f"U_{g}"] for g in gates])
    ln = {}
    for side, n in (("x", 4 * H), ("h", 4 * H), ("c", H)):
        # what nn.LayerNorm(n) calls (eps 1e-5, biased variance), with bpttgen's
        # per-gate gains and biases concatenated as its weight and bias
        weight = P["gamma_c"] if side == "c" else torch.cat([P[f"gamma_{side}{g}"]
                                                             for g in gates])
        bias = P["beta_c"] if side == "c" else torch.cat([P[f"beta_{side}{g}"] for g in gates])
        ln[side] = (lambda v, n=n, w=weight, b=bias:
                    torch.nn.functional.layer_norm(v, (n,), w, b, eps=1e-5))
    hx, cx = torch.from_numpy(state0["h"]), torch.from_numpy(state0["c"])
    hs = []
    for t in range(x.shape[0]):  # custom_lstms.LayerNormLSTMCell.forward, verbatim
        igates = ln["x"](torch.mm(torch.from_numpy(x[t]), W_ih.t()))
        hgates = ln["h"](torch.mm(hx, W_hh.t()))
        gates4 = igates + hgates
        ingate, forgetgate, cellgate, outgate = gates4.chunk(4, 1)
        ingate = torch.sigmoid(ingate)
        forgetgate = torch.sigmoid(forgetgate)
        cellgate = torch.tanh(cellgate)
        outgate = torch.sigmoid(outgate)
        cy = ln["c"]((forgetgate * cx) + (ingate * cellgate))
        hy = outgate * torch.tanh(cy)
        hx, cx = hy, cy
        hs.append(hy)
    return _readout_loss(torch, P, hs, targets), ln


def rmsnorm(torch, P, x, targets, state0, H):
    def norm(a):  # what nn.RMSNorm(H, eps=1e-6) calls
        return torch.nn.functional.rms_norm(a, (H,), P["gamma"], eps=1e-6)

    h = torch.from_numpy(state0["h"])
    hs = []
    for t in range(x.shape[0]):
        a = torch.from_numpy(x[t]) @ P["W_xh"].T + h @ P["W_hh"].T + P["b_h"]
        h = torch.tanh(norm(a))
        hs.append(h)
    return _readout_loss(torch, P, hs, targets, W="W_hy"), {}


def bielman(torch, P, x, targets, state0, H):
    rnn = torch.nn.RNN(x.shape[2], H, bidirectional=True, dtype=torch.float64)
    zero = torch.zeros(H, dtype=torch.float64)  # b_f is nn.RNN's bias_ih, bias_hh is 0
    weights = {"weight_ih_l0": P["W_f"], "weight_hh_l0": P["U_f"], "bias_ih_l0": P["b_f"],
               "bias_hh_l0": zero, "weight_ih_l0_reverse": P["W_b"],
               "weight_hh_l0_reverse": P["U_b"], "bias_ih_l0_reverse": P["b_b"],
               "bias_hh_l0_reverse": zero}
    # h0[1] is the reverse direction's initial state, read at the last step: state0's hb
    h0 = torch.from_numpy(np.stack([state0["hf"], state0["hb"]]))
    out, h_n = torch.func.functional_call(rnn, weights, (torch.from_numpy(x), h0))
    z = out @ torch.cat([P["V_f"], P["V_b"]], dim=1).T + P["b_y"]
    loss = torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]),
                                             torch.from_numpy(targets).reshape(-1))
    return loss, {"final": {"hf": h_n[0], "hb": h_n[1]}}


def embed_lstm(torch, P, x, targets, state0, H):
    gates = "ifgo"
    W_ih = torch.cat([P[f"W_{g}"] for g in gates])
    W_hh = torch.cat([P[f"U_{g}"] for g in gates])
    b = torch.cat([P[f"b_{g}"] for g in gates])
    hx, cx = torch.from_numpy(state0["h"]), torch.from_numpy(state0["c"])
    hs = []
    for t in range(x.shape[0]):
        # what nn.Embedding(V, D) calls, its weight (V, D) the transposed table
        e = torch.nn.functional.embedding(torch.from_numpy(x[t]), P["E"].T)
        gates4 = e @ W_ih.T + hx @ W_hh.T + b  # nn.LSTMCell's, with one bias
        i, f, g, o = gates4.chunk(4, 1)
        cx = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
        hx = torch.sigmoid(o) * torch.tanh(cx)
        hs.append(hx)
    return _readout_loss(torch, P, hs, targets), {}


def agree(torch, name, cell, sizes=None):
    import importlib

    module = importlib.import_module(f"bpttgen.generated.{name}")
    sizes = sizes or {"I": 3, "H": 4, "O": 5}
    params, x, targets, state0 = _problem(module, sizes)
    loss, grads = module.loss_and_grads(params, x, targets, state0=state0)
    P = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    torch_loss, extra = cell(torch, P, x, targets, state0, sizes["H"])
    torch_loss.backward()
    torch_loss = torch_loss.detach().item()
    worst = abs(torch_loss - loss) / abs(loss)
    for k, g in grads.items():
        t = P[k].grad.numpy()
        worst = max(worst, float(np.max(np.abs(t - g)) / max(np.max(np.abs(t)), 1e-300)))
    if "final" in extra:  # each state at the end of its run
        _, final = module.forward(params, x, state0=state0)
        for s, h in extra["final"].items():
            worst = max(worst, float(np.max(np.abs(h.detach().numpy() - final[s]))))
    print(f"{name}: loss {loss:.12f}, torch {torch_loss:.12f}; max relative "
          f"error over the loss and {len(grads)} gradients: {worst:.1e}")
    return worst


def main():
    try:
        import torch
    except ImportError:
        print("torch is not installed; pip install torch --index-url "
              "https://download.pytorch.org/whl/cpu")
        return 0
    torch.set_num_threads(1)
    worst = max(agree(torch, "layernorm_lstm", layernorm_lstm),
                agree(torch, "rmsnorm", rmsnorm), agree(torch, "bielman", bielman),
                agree(torch, "embed_lstm", embed_lstm, {"V": 5, "D": 3, "H": 4}))
    ok = worst < TOL
    print(f"torch {torch.__version__}: {'agree' if ok else 'DISAGREE'} (tolerance {TOL:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
