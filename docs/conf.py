"""Sphinx configuration for refimpl's documentation.

Build from the repository root (no network is used; notebooks are rendered
from their stored outputs, never executed)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import importlib
import pathlib
import re
import sys

from docutils.parsers.rst import directives as _directives
from docutils.parsers.rst import roles as _roles

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))          # document this checkout's refimpl, not an installed one
refimpl = importlib.import_module("refimpl")

project = "refimpl"
author = "refimpl contributors"
copyright = "refimpl contributors, MIT licence"
release = refimpl.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_nb",              # MyST Markdown pages and Jupyter notebooks (includes myst-parser)
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# --- notebooks ------------------------------------------------------------
# The teaching notebooks live in notebooks/ at the repository root; Sphinx only
# reads files under docs/, so they are copied into docs/notebooks/ (ignored by
# git) at every build.  They are rendered from their stored outputs: nothing
# is executed, so the build needs no kernel, no data download and no network.
nb_execution_mode = "off"
NOTEBOOKS = ROOT / "notebooks"
_NB_COPY = DOCS / "notebooks"
_NB_COPY.mkdir(exist_ok=True)
for _stale in _NB_COPY.glob("*.ipynb"):                 # a notebook removed upstream
    if not (NOTEBOOKS / _stale.name).exists():
        _stale.unlink()
# A notebook links a derivation script as ../derivations/<op>.py (right when
# opened from notebooks/); in the site that link goes to the script's page.
_DERIVATION_LINK = re.compile(r"\]\(\.\./derivations/(\w+)\.py\)")
for _nb in sorted(NOTEBOOKS.glob("*.ipynb")):
    _dest = _NB_COPY / _nb.name
    _text = _DERIVATION_LINK.sub(r"](../derivations/\1.md)", _nb.read_text(encoding="utf-8"))
    if not _dest.exists() or _dest.read_text(encoding="utf-8") != _text:
        _dest.write_text(_text, encoding="utf-8")

# --- MyST -----------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# --- API reference --------------------------------------------------------
autosummary_generate = True
autosummary_ignore_module_all = False       # document what each module's __all__ exports
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "none"                  # the numpydoc sections state the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# --- output ---------------------------------------------------------------
html_theme = "alabaster"
html_title = f"refimpl {release}"
html_static_path = []


# --- docstrings that are plain text rather than reStructuredText ------------
# Some docstrings write their maths in plain ASCII (``P * G``, ``|x|``,
# ``sigma_+``), which reStructuredText would read as markup.  Such a docstring
# is shown verbatim as a literal block (its first line stays the summary), so
# that the build can treat every warning as an error and the text reads as
# written.  Unknown Sphinx roles and directives do not count: bare docutils
# does not know them.

# docutils' own lookups, saved before Sphinx replaces them while it reads sources
_DOCUTILS_LOOKUPS = (_directives.directive, _roles.role)


def _rst_problems(text):
    import io

    import docutils.core
    from docutils.parsers.rst import directives, roles

    stream = io.StringIO()
    # parse with docutils' own roles and directives only (Sphinx registers its
    # own globally, and they need a build environment)
    saved = directives._directives.copy(), roles._roles.copy()
    lookups = directives.directive, roles.role
    directives._directives.clear()
    roles._roles.clear()
    directives.directive, roles.role = _DOCUTILS_LOOKUPS
    try:
        docutils.core.publish_doctree(
            text, settings_overrides={"report_level": 2, "halt_level": 5,
                                      "warning_stream": stream,
                                      "file_insertion_enabled": False, "raw_enabled": False})
    except Exception:  # noqa: BLE001 -- a Sphinx directive inside: leave it to Sphinx
        return []
    finally:
        directives._directives.update(saved[0])
        roles._roles.update(saved[1])
        directives.directive, roles.role = lookups
    lines = [ln for ln in stream.getvalue().splitlines()
             if "(WARNING/2)" in ln or "(ERROR/3)" in ln or "(SEVERE/4)" in ln]
    return [ln for ln in lines if "Unknown interpreted text role" not in ln
            and "Unknown directive type" not in ln and 'No role entry for' not in ln
            and 'No directive entry for' not in ln]


_STAR_WORD = re.compile(r"(?<![*\w`\\])\*(\w+)(?![\w*])")


def _verbatim_if_not_rst(app, what, name, obj, options, lines):
    # "(..., *core)" in a numpydoc type: a lone star before a word is literal text
    for i, ln in enumerate(lines):
        parts = ln.split("``")          # odd parts are inline literals: left alone
        lines[i] = "``".join(_STAR_WORD.sub(r"\\*\1", p) if j % 2 == 0 else p
                             for j, p in enumerate(parts))
    if not lines or not _rst_problems("\n".join(lines)):
        return
    summary, rest = lines[0].strip(), lines[1:]
    if _rst_problems(summary) or summary.endswith("::"):
        summary = "``" + summary.replace("``", "'") + "``"
    lines[:] = [summary, "", "::", ""] + ["    " + ln for ln in rest] + [""]


def setup(app):
    app.connect("autodoc-process-docstring", _verbatim_if_not_rst, priority=400)
