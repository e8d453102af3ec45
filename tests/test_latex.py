"""derive/latex.py: the printed derivation compiles, reads as committed, and its three
forms hold the same equations.

Compilation uses a real LaTeX engine (pdflatex; the Debian packages are listed in
.ci/apt-packages.txt). Without it the compile tests skip locally and fail in CI.
All documents compile at once, in parallel, in one module-scoped fixture.
"""

import difflib
import doctest
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

import bpttgen.derive.latex
import bpttgen.derive.naming
from bpttgen.derive import derive as derive_model
from bpttgen.derive.latex import FORMS, render
from bpttgen.derive.loader import load_model
from bpttgen.derive.models import BUILTIN, build

from helpers import fuzz_derivations

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden")
USER_CELL = os.path.join(HERE, "data", "latex_cell.py")
UPDATE_ENV = "BPTTGEN_UPDATE_GOLDEN"
REGENERATE = f"{UPDATE_ENV}=1 python -m pytest tests/test_latex.py -k golden"

#: Overfull lines wider than this (TeX points) make an equation run into the margin.
OVERFULL_LIMIT_PT = 10.0


def derivation(name):
    return derive_model(load_model(USER_CELL) if name == "user" else build(name))


# -- compiling -------------------------------------------------------------------------

def _pdflatex():
    exe = shutil.which("pdflatex")
    if exe is None:
        message = ("pdflatex not found; install it with: apt-get install -y "
                   "$(cat .ci/apt-packages.txt)")
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (required in CI)")
        pytest.skip(message)
    return exe


def _compile(exe, source, workdir):
    """pdflatex until cross-references settle (at most 3 runs): (returncode, log)."""
    with open(os.path.join(workdir, "doc.tex"), "w") as f:
        f.write(source)
    for _ in range(3):
        proc = subprocess.run([exe, "-interaction=nonstopmode", "-halt-on-error",
                               "-no-shell-escape", "doc.tex"], cwd=workdir,
                              capture_output=True, text=True, timeout=300)
        log_path = os.path.join(workdir, "doc.log")
        log = open(log_path, errors="replace").read() if os.path.exists(log_path) \
            else proc.stdout
        if proc.returncode != 0 or "Rerun" not in log:
            return proc.returncode, log
    return proc.returncode, log


def log_problems(log):
    """Errors, undefined or unsettled references and wide overfull lines in a log."""
    problems = [line for line in log.splitlines() if line.startswith("!")]
    for pattern in (r"LaTeX Warning: Reference .* undefined.*",
                    r"There were undefined references.*", r"LaTeX Warning: Label .*",
                    r".*Rerun to get cross-references right.*"):
        problems += re.findall(pattern, log)
    for points in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\)", log):
        if float(points) > OVERFULL_LIMIT_PT:
            problems.append(f"Overfull \\hbox ({points}pt too wide)")
    return problems


def _wrap_fragment(fragment):
    return ("\\documentclass{article}\n\\usepackage{amsmath}\n\\allowdisplaybreaks\n"
            "\\begin{document}\n" + fragment + "\n\\end{document}\n")


#: What the compile fixture builds: id -> (model, form, index_form).
COMPILE_CASES = {
    **{name: (name, "document", False) for name in BUILTIN},
    "user": ("user", "document", True),
    "gru-index": ("gru", "document", True),
    "lstm2-index": ("lstm2", "document", True),
    "lstm-fragment": ("lstm", "fragment", True),
    "rmsnorm-index": ("rmsnorm", "document", True),  # reductions, per element too
}


@pytest.fixture(scope="module")
def compiled():
    """case id -> (returncode, log), every case compiled in parallel."""
    exe = _pdflatex()
    # Render first, in this thread (SymPy's caches are not meant for concurrent
    # printing), then run the engines in parallel: they are the slow part.
    sources = {}
    for case, (name, form, index_form) in COMPILE_CASES.items():
        source = render(derivation(name), form=form, index_form=index_form)
        sources[case] = _wrap_fragment(source) if form == "fragment" else source

    def job(case):
        with tempfile.TemporaryDirectory(prefix=f"bpttgen-latex-{case}-") as workdir:
            return _compile(exe, sources[case], workdir)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
        return dict(zip(COMPILE_CASES, pool.map(job, COMPILE_CASES)))


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_document_compiles(compiled, case):
    returncode, log = compiled[case]
    problems = log_problems(log)
    assert returncode == 0 and not problems, (
        f"pdflatex failed on {case} (exit {returncode}):\n" + "\n".join(problems[:20])
        + "\n--- end of log ---\n" + log[-3000:])


def test_user_definition_file_is_printed():
    """A definition file outside derive/, with its own SymPy function, prints with no
    change to the engine: the user's function by name, the diagonal weight, the loss
    at the last step."""
    text = render(derivation("user"), form="markdown")
    assert r"\operatorname{swish}" in text
    assert r"\mathbf{h}_{t-1} \odot \mathbf{v}_{h}" in text
    assert "loss at the last step only" in text


# -- golden text -----------------------------------------------------------------------

@pytest.mark.parametrize("form, filename", [("markdown", "elman.md"), ("document", "elman.tex"),
                                            ("document", "rmsnorm.tex"),
                                            ("document", "bielman.tex")])
def test_golden(form, filename):
    # rmsnorm: a reduction over the units (its sums over j, 1^T, scalar symbols);
    # bielman: a reverse state (s_{t+1}, its recurrence forward in time)
    text = render(derivation(filename.split(".")[0]), form=form)
    path = os.path.join(GOLDEN, filename)
    if os.environ.get(UPDATE_ENV) == "1":
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        expected = f.read()
    if text != expected:
        diff = "".join(list(difflib.unified_diff(
            expected.splitlines(True), text.splitlines(True), f"tests/golden/{filename}",
            f"render({filename.split('.')[0]})"))[:80])
        pytest.fail(f"the printed derivation differs from tests/golden/{filename}.\n"
                    f"If the change is intended, regenerate the golden files with\n"
                    f"    {REGENERATE}\nand review the diff before committing.\n\n{diff}",
                    pytrace=False)


# -- the three forms agree -------------------------------------------------------------

_ALIGN = re.compile(r"\\begin\{align\}\n(.*?)\n\\end\{align\}", re.S)
_ROW = re.compile(r"(.*?)\\label\{([^}]*)\}(?:\\\\\n)?", re.S)
_MD_EQ = re.compile(r"^\$\$\n(.*?) \\tag\{(\d+)\}\n\$\$$", re.S | re.M)


def _latex_equations(text):
    """[(label, body)] of every align row, the line breaks undone."""
    out = []
    for block in _ALIGN.findall(text):
        for body, label in _ROW.findall(block):
            body = re.sub(r"\s*\\nonumber\\\\\s*&\\quad\s*", " ", body)
            out.append((label, " ".join(body.replace("&", "", 1).split())))
    return out


def _markdown_equations(text):
    return [(int(number), " ".join(body.split())) for body, number in _MD_EQ.findall(text)]


@pytest.mark.parametrize("name", list(BUILTIN) + ["user"])
def test_forms_hold_the_same_equations(name):
    d = derivation(name)
    document = render(d, form="document", index_form=True)
    fragment = render(d, form="fragment", index_form=True)
    markdown = render(d, form="markdown", index_form=True)

    doc_eqs, frag_eqs, md_eqs = (_latex_equations(document), _latex_equations(fragment),
                                 _markdown_equations(markdown))
    assert doc_eqs and doc_eqs == frag_eqs
    assert [body for _, body in doc_eqs] == [body for _, body in md_eqs]
    assert [n for n, _ in md_eqs] == list(range(1, len(md_eqs) + 1))
    assert markdown.count("$$") == 2 * len(md_eqs)

    labels = [label for label, _ in doc_eqs]
    assert len(set(labels)) == len(labels)
    assert document.count(r"\begin{align}") == document.count(r"\end{align}")
    assert set(re.findall(r"\\eqref\{([^}]*)\}", document)) <= set(labels)
    for ref in re.findall(r"\((\d+)\)", markdown):
        assert 1 <= int(ref) <= len(md_eqs)

    assert document.startswith("%") and r"\documentclass" in document
    assert r"\documentclass" not in fragment and r"\eqref" not in fragment
    assert r"\label" not in markdown and r"\eqref" not in markdown


@pytest.mark.parametrize("name", list(BUILTIN) + ["user"])
def test_markdown_survives_github(name):
    """GitHub runs Markdown's backslash escapes over $$ blocks before MathJax sees them:
    \\, becomes ',' and \\\\ one backslash. The Markdown form uses neither."""
    markdown = render(derivation(name), form="markdown", index_form=True)
    escapes = sorted(set(re.findall(r"\\[!-/:-@\[-`{-~]", markdown)))
    assert not escapes, f"backslash-punctuation in Markdown math: {escapes}"


def test_index_form_is_optional():
    d = derivation("elman")
    assert "Per-element form" not in render(d, form="markdown")
    assert "Per-element form" in render(d, form="markdown", index_form=True)


def test_every_partial_is_printed():
    """The backward step prints the Derivation's local derivatives, not a rederivation."""
    d = derivation("lstm")
    printer = bpttgen.derive.latex._Builder(d, False).vec
    text = render(d, form="markdown")
    for t in d.backward.terms:
        if t.rule == "local" and t.expr != 1:
            assert printer.doprint(t.expr) in text, (t.via, t.target)


def test_unknown_form():
    with pytest.raises(ValueError, match="unknown form"):
        render(derivation("elman"), form="html")
    assert FORMS == ("document", "fragment", "markdown", "text")


@pytest.mark.parametrize("module", [bpttgen.derive.naming, bpttgen.derive.latex])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.failed == 0


# -- the text form (derive/plaintext.py) ------------------------------------------------

def test_text_form_leaves_no_latex_for_any_cell():
    """Every built-in and fuzz-drawn cells print as text with no control sequence left:
    plaintext.py knows the whole vocabulary latex.py prints (it raises on a new one)."""
    derivations = [derivation(name) for name in BUILTIN] + \
        [d for _, d in fuzz_derivations(seed=5, cells=30)]
    assert len(derivations) > len(BUILTIN) + 5
    for d in derivations:
        text = render(d, form="text", index_form=True)
        assert "\\" not in text and "$" not in text, d.name
        numbers = bpttgen.derive.latex.equation_numbers(d)
        for number in numbers.values():
            assert f"({number}) " in text


def test_the_target_class_is_no_name_of_the_model():
    """An integer target's class is c_t unless the model has a c of its own (the LSTM's
    cell state, which the text form would print the same); then another free letter.
    Every built-in and fuzz-drawn cell with an integer target."""
    derivations = [derivation(name) for name in BUILTIN] + \
        [d for _, d in fuzz_derivations(seed=5, cells=30)]
    checked = 0
    for d in derivations:
        if d.loss.loss.target != "index":
            continue
        names = bpttgen.derive.naming.LatexNames(d)
        bases = {bpttgen.derive.naming.split(n).base for n in names._identifiers()}
        assert names.target_class not in bases | {names.index, names.sum_index}, d.name
        checked += 1
    assert checked > 5
    assert "the class c_t" in derivation("elman").render("text")
    lstm = derivation("lstm").render("text")
    assert "the class c_t" not in lstm and "the class r_t" in lstm


def test_text_form_reads_like_the_math():
    from bpttgen.derive.plaintext import to_text

    text = derivation("lstm").render("text")
    assert "(6) h_t = o_t ⊙ tanh(c_t)\n" in text
    assert "δ^c_t = δ^h_t ⊙ o_t ⊙ (1 - tanh²(c_t)) + c̄_t" in text
    assert to_text(r"\frac{\partial L}{\partial \mathbf{W}_{hh}}") == "∂L/∂W_{hh}"
    assert to_text(r"\sqrt{x^{2} + 1}") == "√(x² + 1)"
    assert to_text(r"\overline{\mathbf{W}\mathbf{x}_{t}}") == "bar(W x_t)"
    with pytest.raises(ValueError, match="no text form for \\\\unknowncommand"):
        to_text(r"\unknowncommand{x}")


def test_derivation_shows_itself_in_a_notebook():
    d = derivation("gru")
    assert d._repr_markdown_() == render(d, form="markdown")
    assert repr(d).startswith("<Derivation of 'gru': states h;")
