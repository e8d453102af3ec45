"""Writes docs/derivation_lstm.png, the README's picture of a rendered derivation:
some equations of `bpttgen latex lstm`, under their numbers in the whole document.

    python docs/derivation_picture.py      # needs pdflatex and PyMuPDF (pip install pymupdf)
"""

import os
import subprocess
import tempfile

import pymupdf
from PIL import Image, ImageChops

from bpttgen.derive import latex
from bpttgen.derive.derivation import derive
from bpttgen.derive.models import build

KEYS = ("vector:fwd:i", "vector:fwd:c", "vector:fwd:h", "acc", "vector:adj:h",
        "vector:adj:c", "vector:grad:U_f")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "derivation_lstm.png")


def main():
    d = derive(build("lstm"))
    blocks = latex._Builder(d, False).build()
    eqs = [e for e in latex._numbered(blocks) if e.key in KEYS]
    body = latex._LatexWriter(d, blocks).align(eqs)
    for e in eqs:  # the numbers of the whole document, not 1..7
        body = body.replace(r"\label{%s}" % e.label, r"\tag{%d}" % e.number)
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "d.tex"), "w") as f:
            f.write("\\documentclass[12pt]{article}\n\\usepackage[paperwidth=17cm,"
                    "paperheight=9cm,margin=0.3cm]{geometry}\n\\usepackage{amsmath}\n"
                    "\\pagestyle{empty}\n\\begin{document}\n" + body + "\n\\end{document}\n")
        subprocess.run(["pdflatex", "-interaction=nonstopmode", "d.tex"], cwd=folder,
                       check=True, capture_output=True)
        png = os.path.join(folder, "d.png")
        pymupdf.open(os.path.join(folder, "d.pdf"))[0].get_pixmap(dpi=150).save(png)
        image = Image.open(png).convert("RGB")
    box = ImageChops.difference(image, Image.new("RGB", image.size, "white")).getbbox()
    image.crop((box[0] - 15, box[1] - 15, box[2] + 15, box[3] + 15)).save(OUT, optimize=True)
    print(OUT)


if __name__ == "__main__":
    main()
