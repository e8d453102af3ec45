"""From a Derivation to source code, installed as bpttgen.codegen.

Build time: plan.py (the layout: storage, schedule, shared adjoints), printer.py
(SymPy to Numba scalar code), render.py / render_cuda.py / rtrl.py (the template
contexts of the CPU, CUDA and RTRL code), generate.py (verify and write files).
runtime/ is what generated modules import; app/ is the bpttgen command.
"""

if __name__.split(".")[0] == "codegen":  # a checkout's folder imported as the old top level
    from bpttgen.derive.errors import old_import_message

    raise ImportError(old_import_message("codegen"), name="codegen")
