"""Writes examples/new_cell.ipynb with empty outputs (CI runs it: tests/test_examples.py).

    python examples/make_new_cell_notebook.py
"""
import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell("""# A new recurrent cell, from definition to training curves

This notebook defines a cell bpttgen has never seen (a minimal gated unit with a
peephole on its gate), shows the BPTT derivation SymPy finds for it, generates its
Numba module, checks every gradient against finite differences, trains it on the
parity task and plots the curve. It runs top to bottom in about a minute, most of it
Numba compiling the new kernels; CI executes it (`tests/test_examples.py`)."""),
    new_code_cell("""from bpttgen import Model, sigmoid, softmax_cross_entropy, tanh

m = Model("peephole_mgu", sizes=("I", "H", "O"))
x, h = m.input("x", "I"), m.state("h", "H")
f = m.node("f", sigmoid(m.matrix("W_f", "H", "I") @ x + m.matrix("U_f", "H", "H") @ h.prev
                        + m.diagonal("p_f", "H") * h.prev + m.bias("b_f", "H")))
n = tanh(m.matrix("W_n", "H", "I") @ x + m.matrix("U_n", "H", "H") @ (f * h.prev)
         + m.bias("b_n", "H"))
m.update(h, (1 - f) * h.prev + f * n)
m.output(m.matrix("W_y", "O", "H") @ h + m.bias("b_y", "O"), loss=softmax_cross_entropy);"""),
    new_markdown_cell("""## The derivation

A `Derivation` shows itself as math: the forward step, the loss, the accumulated
adjoint recurrence, the gradients, RTRL's tangents, each equation numbered. The
generated kernels cite these numbers on the lines that implement them."""),
    new_code_cell("""from bpttgen.derive import derive

d = derive(m)
d"""),
    new_markdown_cell("""The same in a terminal, as plain text (`bpttgen latex FILE --form text`);
here the backward step alone:"""),
    new_code_cell("""from bpttgen.derive.latex import section_equations

print("\\n".join(section_equations(d)["Backward step: the accumulated recurrence"]))"""),
    new_markdown_cell("""## Generate and check

`generate` checks the float64 gradients of the kernels (run as plain Python) against
central finite differences before it writes the module; `gradcheck.check` then
compiles it and compares every algorithm's gradient with finite differences."""),
    new_code_cell("""import tempfile

from bpttgen.codegen.generate import generate, import_path
from bpttgen.codegen.runtime import gradcheck

folder = tempfile.mkdtemp(prefix="bpttgen-notebook-")
path, = generate(m, folder, "examples/new_cell.ipynb")
module = import_path(path)
rows = gradcheck.check(module)
print(gradcheck.format_table(rows))
assert all(r.passed for r in rows)"""),
    new_markdown_cell("""## Train

Parity: the running XOR of a bit stream, a task that needs the state to carry one bit
over the whole sequence."""),
    new_code_cell("""from bpttgen.codegen.app import tasks

data = tasks.parity(seq_len=12, n=256, seed=1)
trainer = module.Trainer({"I": 1, "H": 12, "O": 2}, optimizer="adam", lr=0.02, seed=0)
history = trainer.fit(data.x, data.targets, epochs=12, batch_size=32, progress=False)
print(f"loss {history['loss'][0]:.3f} -> {history['loss'][-1]:.3f} "
      f"(a model without memory: {data.baseline:.3f})")"""),
    new_code_cell("""from IPython.display import Image

Image(trainer.plot(f"{folder}/curve.png", baseline=data.baseline, title="parity, T = 12"))"""),
]
nb = new_notebook(cells=cells, metadata={
    "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
    "language_info": {"name": "python"}})
nbformat.write(nb, os.path.join(os.path.dirname(os.path.abspath(__file__)), "new_cell.ipynb"))
