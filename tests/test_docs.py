"""The API reference (scripts/api_docs.py, which scripts/docs.sh runs) builds without problems, with only
eojax's required packages and pdoc importable: one page per module, the guides beside them, broken
references found.

The build runs once, in a subprocess where every installed package outside eojax's and pdoc's
requirements is hidden (torch, wandb, pystac, xarray, zarr, scikit-learn...), on the real docs/*.md
plus one planted guide with a broken reference and a missing page: exactly those two problems (and
no other) must come back.
"""
from __future__ import annotations

import ast
import html
import re
import shutil
import subprocess
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import api_docs  # noqa: E402  (scripts/ is not a package)

PLANTED = """# A planted guide

`eojax.train.setup` builds a run; `eojax.train.no_such_function` does not exist; see
`docs/no_such_guide.md` and `docs/zoo.md`.
"""
PLANTED_PROBLEMS = {
    "guides.planted: `eojax.train.no_such_function` names nothing in eojax",
    "guides.planted: mentions docs/no_such_guide.md, which does not exist",
}

# Hides the named top-level packages (argv[3]) from every import, then runs the builder as
# scripts/docs.sh does, with the guides read from argv[2].
BUILD = """
import importlib.machinery, sys
from pathlib import Path
hidden = set(sys.argv[3].split(","))

class WithoutOptional(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] in hidden else super().find_spec(name, path, target)

sys.meta_path[:] = [WithoutOptional if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
for name in ("torch", "sklearn"):
    if name in hidden:
        try:
            __import__(name)
            sys.exit(f"{name} was meant to be hidden")
        except ImportError:
            pass
sys.path.insert(0, "scripts")
import api_docs
api_docs.GUIDES = Path(sys.argv[2])
sys.exit(api_docs.main([sys.argv[1]]))
"""


def requirement_closure(*dists: str) -> set[str]:
    """The distributions `dists` need, themselves included (no extras), from the installed metadata."""
    seen, todo = set(), list(dists)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def optional_packages() -> set[str]:
    """Installed top-level import names that no distribution eojax or pdoc requires provides."""
    needed = requirement_closure("eojax", "pdoc")
    return {name for name, dists in metadata.packages_distributions().items()
            if name.isidentifier() and not any(canonicalize_name(d) in needed for d in dists)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("docs")
    guides = tmp / "guides"
    guides.mkdir()
    for page in (REPO / "docs").glob("*.md"):
        shutil.copy(page, guides / page.name)
    (guides / "planted.md").write_text(PLANTED)
    hidden = optional_packages()
    assert "sklearn" in hidden  # in the test extras, never needed by eojax
    proc = subprocess.run([sys.executable, "-c", BUILD, str(tmp / "site"), str(guides),
                           ",".join(sorted(hidden))], cwd=REPO, capture_output=True, text=True, timeout=600)
    problems = {line.removeprefix("docs problem: ") for line in proc.stderr.splitlines()
                if line.startswith("docs problem: ")}
    return tmp / "site", proc, problems


def page_text(path: Path, section: str | None = None) -> str:
    """The visible text of a page (or of its <section id=...>), tags dropped, spaces collapsed."""
    page = path.read_text(encoding="utf-8")
    if section is not None:
        start = page.index(f'<section id="{section}">')
        page = page[start:page.index("</section>", start)]
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", page)).split())


def test_builds_with_only_the_planted_problems(built):
    out, proc, problems = built
    assert problems == PLANTED_PROBLEMS, proc.stderr[-5000:]
    assert proc.returncode == 1
    assert not list(out.parent.glob(".site.partial-*"))  # the pages went into place all at once


def test_a_page_for_every_module(built):
    out, _, _ = built
    modules = [p.relative_to(REPO).with_suffix("") for p in (REPO / "eojax").rglob("*.py")]
    modules = [m.parent if m.name == "__init__" else m for m in modules]
    assert len(modules) > 100
    missing = [str(m) for m in modules if not (out / f"{m}.html").is_file()]
    assert not missing
    for package in ("mae", "seg", "vsat", "diffusion", "geo", "classify", "data", "weights", "optim",
                    "parallel", "tasks", "models", "train", "checkpoint", "zoo"):
        assert (out / "eojax" / f"{package}.html").is_file(), package
    # eojax.data's __all__ names no submodule; its navigation still lists them all.
    nav = (out / "eojax" / "data.html").read_text()
    assert '<a href="data/raster.html">raster</a>' in nav


def docstring_and_args(path: Path, function: str) -> tuple[str, list[str]]:
    """From the source itself: the function's docstring and parameter names."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            args = node.args
            return ast.get_docstring(node), [a.arg for a in args.args + args.kwonlyargs]
    raise AssertionError(f"{function} not in {path}")


@pytest.mark.parametrize("module, function", [("train", "setup"), ("checkpoint", "load_variables"),
                                              ("diffusion/sd", "generate")])
def test_known_functions_are_documented(built, module, function):
    out, _, _ = built
    doc, args = docstring_and_args(REPO / "eojax" / f"{module}.py", function)
    text = page_text(out / "eojax" / f"{module}.html", section=function)
    assert text.startswith(f"def {function}(")
    assert all(a in text for a in args)
    first_words = " ".join(doc.replace("`", "").split()[:8])
    assert first_words in text


def test_guides_are_pages_and_references_link(built):
    out, _, _ = built
    for guide in (REPO / "docs").glob("*.md"):
        heading = next(line[2:].strip() for line in guide.read_text().splitlines() if line.startswith("# "))
        page = out / "guides" / f"{guide.stem}.html"
        assert heading.replace("`", "") in page_text(page), guide.name
    planted = (out / "guides" / "planted.html").read_text()
    assert '<a href="../eojax/train.html#setup">eojax.train.setup</a>' in planted
    assert '<a href="../guides/zoo.html"><code>docs/zoo.md</code></a>' in planted
    assert "<code>eojax.train.no_such_function</code>" in planted  # left as text
    # Every page links every guide; the search index covers the API and the guides.
    assert '<a href="../guides/zoo.html">zoo</a>' in (out / "eojax" / "train.html").read_text()
    search = (out / "search.js").read_text()
    assert "load_variables" in search and "planted guide" in search


def test_annotation_warnings_count_only_when_python_cannot_resolve_them(monkeypatch):
    """pdoc misreads the annotations of inherited dataclass fields; such a warning is set aside only when
    typing.get_type_hints resolves the annotations where they are declared."""
    probe = types.ModuleType("eojax._docs_probe")
    exec("def ok(x: int) -> str: ...\ndef broken(x: 'NoSuchType') -> str: ...", probe.__dict__)
    monkeypatch.setitem(sys.modules, "eojax._docs_probe", probe)
    warning = "Error parsing type annotation {} for eojax._docs_probe.{}. Import of {} failed: name not defined"
    assert api_docs._annotation_is_pdocs_miss(warning.format("int", "ok", "int"))
    assert not api_docs._annotation_is_pdocs_miss(warning.format("NoSuchType", "broken", "NoSuchType"))
    assert api_docs._annotation_is_pdocs_miss(  # third-party: not ours to fix
        "Error parsing type annotation utils.VersionOrStr for tensorflow_datasets.core.BuilderConfig.version. "
        "Import of Version failed: name 'Version' is not defined")
    assert not api_docs._annotation_is_pdocs_miss("Couldn't import eojax.x: ImportError")
