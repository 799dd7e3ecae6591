"""The API reference: HTML pages rendered by pdoc from eojax's docstrings, the guides in docs/*.md
rendered beside them, one search box over both.

    python scripts/api_docs.py OUT      # scripts/docs.sh: OUT = site

OUT/index.html lists every page; OUT/eojax/... holds one page per module, OUT/guides/<name>.html one
per docs/<name>.md. Every problem is listed and makes the exit status 1: a module that does not
import, any warning pdoc raises while documenting, a `eojax.*` reference (in a docstring or a guide)
that names nothing in eojax, a `docs/<name>.md` mentioned that does not exist. OUT is replaced only
once every page is written. tests/test_docs.py runs this with the optional packages (torch, wandb,
pystac...) hidden, so every module must import without them.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import shutil
import sys
import tempfile
import types
import typing
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ROOT / "docs"
TEMPLATES = Path(__file__).resolve().with_name("pdoc_templates")

# A `eojax.x.y` in code style that pdoc did not turn into a link: it names nothing, or something the
# reference leaves out.
UNLINKED_REF = re.compile(r"<code>(eojax(?:\.\w+)+)(?:\(\))?</code>")
GUIDE_MENTION = re.compile(r"<code>docs/(\w+)\.md</code>")


def module_names() -> list[str]:
    """eojax and every module under it, from the file tree (pdoc's own walk skips the submodules a
    package's __all__ leaves out)."""
    import eojax

    names = ["eojax"]
    # A package that fails to import is reported by build(); its submodules cannot be listed.
    for info in pkgutil.walk_packages(eojax.__path__, "eojax.", onerror=lambda name: None):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def guide_modules() -> list[types.ModuleType]:
    """docs/<name>.md as module objects `guides.<name>` whose docstring is the page, so pdoc renders them
    with its own layout, table of contents and search."""
    guides = []
    for path in sorted(GUIDES.glob("*.md")):
        module = types.ModuleType(f"guides.{path.stem}", path.read_text(encoding="utf-8"))
        module.__docformat__ = "markdown"
        guides.append(module)
    return guides


_MISSING = object()


def _lookup(dotted: str, *, stop_at_class: bool = False):
    """The object `dotted` names (the longest importable module prefix, then attributes), or _MISSING.
    stop_at_class: a class's member gives the class itself."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for part in parts[end:]:
            if stop_at_class and inspect.isclass(obj):
                break
            obj = getattr(obj, part, _MISSING)
            if obj is _MISSING:
                break
        return obj
    return _MISSING


def _annotation_is_pdocs_miss(message: str) -> bool:
    """pdoc evaluates the string annotations of an inherited dataclass field (a flax module's) or of a
    NamedTuple in the wrong module's namespace and warns; it then shows the annotation as written.
    Such a warning is a real problem only where Python cannot resolve the annotation either
    (typing.get_type_hints on the class, function or module that declares it); third-party classes
    are not ours to fix."""
    found = re.match(r"(?:Error parsing type annotation|Failed to run TYPE_CHECKING code while parsing) "
                     r".*? (?:type annotation )?for ([\w.]+)", message)
    if not found:
        return False
    dotted = found.group(1).rstrip(".")
    if not dotted.startswith("eojax."):
        return True
    owner = _lookup(dotted, stop_at_class=True)
    if not (inspect.isclass(owner) or inspect.isfunction(owner)):  # a module-level variable
        owner = _lookup(dotted.rpartition(".")[0])
    try:
        typing.get_type_hints(owner)
    except Exception:  # noqa: BLE001 - any failure to resolve is what the warning reported
        return False
    return True


def _link_guides(page: str, depth: int, guides: set[str], problems: list[str], where: str) -> str:
    def repl(m: re.Match) -> str:
        if m.group(1) not in guides:
            problems.append(f"{where}: mentions docs/{m.group(1)}.md, which does not exist")
            return m.group(0)
        return f'<a href="{"../" * depth}guides/{m.group(1)}.html">{m.group(0)}</a>'

    return GUIDE_MENTION.sub(repl, page)


def build(out: Path) -> tuple[list[str], list[str]]:
    """Writes the reference into `out` (made if absent); returns (problems, notes): the problems fail
    the build, the notes are for information."""
    import pdoc.doc
    import pdoc.render

    problems: list[str] = []
    notes: list[str] = []
    names = module_names()
    for name in names:  # before pdoc runs, so its warnings below are about the docs alone
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - every failure is reported, the build goes on
            problems.append(f"{name}: cannot be imported: {type(e).__name__}: {e}")
    names = [n for n in names if n in sys.modules]

    # google: the few docstrings with Args: sections; no source listings (the pages stay 3x smaller).
    pdoc.render.configure(docformat="google", show_source=False, template_directory=TEMPLATES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guides = {m.__name__: pdoc.doc.Module(m) for m in guide_modules()}
        all_modules = guides | {n: pdoc.doc.Module.from_name(n) for n in names}
        guide_names = {n.removeprefix("guides.") for n in guides}
        pdoc.render.env.globals["guides"] = list(guides)
        pdoc.render.env.globals["child_modules"] = lambda parent: [
            n for n in all_modules if n.rpartition(".")[0] == parent]
        pages = {}
        for name, module in all_modules.items():
            page = pdoc.render.html_module(module, all_modules)
            for ref in sorted(set(UNLINKED_REF.findall(page))):
                if _lookup(ref) is _MISSING:
                    problems.append(f"{name}: `{ref}` names nothing in eojax")
                else:
                    notes.append(f"{name}: `{ref}` exists but is not in the reference (private, or "
                                 "left out of its package's __all__)")
            pages[name] = _link_guides(page, name.count("."), guide_names, problems, name)
        index = pdoc.render.html_index(all_modules)
        search = pdoc.render.search_index(all_modules)
    for w in caught:
        message = str(w.message)
        if not _annotation_is_pdocs_miss(message) and f"pdoc: {message}" not in problems:
            problems.append(f"pdoc: {message}")

    for name, page in pages.items():
        path = out / f"{name.replace('.', '/')}.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    (out / "index.html").write_text(index, encoding="utf-8")
    (out / "search.js").write_text(search, encoding="utf-8")
    return problems, notes


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/api_docs.py OUT_FOLDER", file=sys.stderr)
        return 2
    out = Path(argv[0]).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        problems, notes = build(partial)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)  # all pages at once: a build that crashes leaves the previous ones in place
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    for note in notes:
        print(f"docs note: {note}", file=sys.stderr)
    for p in problems:
        print(f"docs problem: {p}", file=sys.stderr)
    print(f"API reference in {out}/index.html ({len(problems)} problems)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
