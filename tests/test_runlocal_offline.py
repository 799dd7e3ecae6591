"""Every `:runlocal` config runs on a fresh machine: with EOJAX_TEST_DATA unset, HOME and the eojax
cache in an empty folder and the working directory elsewhere, its input stage builds its DataSpec and
a first training batch, and nothing it opens (Python's open / listdir / scandir / glob, and every
rasterio.open) lies beside the checkout (../shared/data), in the real home or the real cache. The
training itself is the same code on the same batches; the notebooks run these configs (test_notebook)."""
import glob
import os
import site
import sys

import pytest
import rasterio

from eojax import tasks
from helpers import REPO, load_config

# Every config file with a runlocal variant, plus the other documented runlocal commands.
CASES = [(os.path.splitext(os.path.basename(p))[0], "runlocal")
         for p in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))) if "runlocal" in open(p).read()]
CASES += [("vsat", "mode=great,runlocal"), ("seg", "encoder=unet,decoder=unet,runlocal")]
# The packaged real samples (eojax.sample_data) the seg, classification and vsat notebooks train on.
CASES += [(name, "runlocal,data=sample") for name in ("seg", "classify", "vsat")]
# Smaller synthetic sets where writing them dominates (the same writer and reader, fewer files).
CHEAPER = {"diffusion": {"input.synthetic_n": 64}}

_AUDITED = ("open", "os.listdir", "os.scandir", "glob.glob")
_opened: list | None = None  # the paths opened while a test watches, else None


def _audit(event, args):
    if _opened is not None and event in _AUDITED and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if path and "://" not in path:
            _opened.append(os.path.abspath(path))


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one only records while _opened is a list


def _under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


class Sandbox:
    """What a fresh machine has: the checkout, the installed packages and an empty folder."""

    def __init__(self, tmp_path, monkeypatch, pytest_tmp=None):
        self.forbidden = [os.path.join(os.path.dirname(REPO), n) for n in os.listdir(os.path.dirname(REPO))
                          if os.path.join(os.path.dirname(REPO), n) != REPO]
        self.forbidden += [os.path.expanduser("~")] + [os.environ[v] for v in ("EOJAX_TEST_DATA", "EOJAX_CACHE")
                                                        if os.environ.get(v)]
        # pytest's own temporary folders (an earlier case's synthetic cache, reused by a memoised path)
        # are no user data: a checkout whose parent is /tmp would otherwise forbid them.
        self.allowed = [REPO, str(tmp_path), *([str(pytest_tmp)] if pytest_tmp else []), sys.prefix,
                        sys.base_prefix, *site.getsitepackages()]
        for name in ("home", "cache", "cwd"):
            (tmp_path / name).mkdir()
        monkeypatch.delenv("EOJAX_TEST_DATA", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
        monkeypatch.setenv("EOJAX_CACHE", str(tmp_path / "cache"))
        monkeypatch.chdir(tmp_path / "cwd")
        real_open = rasterio.open

        def recording_open(fp, *args, **kwargs):
            if isinstance(fp, (str, os.PathLike)) and _opened is not None:
                _opened.append(os.path.abspath(os.fspath(fp)))
            return real_open(fp, *args, **kwargs)
        monkeypatch.setattr(rasterio, "open", recording_open)

    def outside(self, paths) -> list[str]:
        return sorted({p for p in paths if _under(p, self.forbidden) and not _under(p, self.allowed)})


@pytest.fixture
def sandbox(tmp_path, tmp_path_factory, monkeypatch):
    global _opened
    box = Sandbox(tmp_path, monkeypatch, tmp_path_factory.getbasetemp())
    _opened = []
    try:
        yield box
    finally:
        _opened = None


def _config_paths(value, key="config"):
    """(key, absolute path) of every string in a config that is one."""
    if hasattr(value, "items"):
        for k, v in value.items():
            yield from _config_paths(v, f"{key}.{k}")
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _config_paths(v, f"{key}[{i}]")
    elif isinstance(value, str) and os.path.isabs(value):
        yield key, value


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" for n, a in CASES])
def test_runlocal_input_needs_nothing_beside_the_checkout(name, arg, sandbox):
    config = load_config(name, arg, **CHEAPER.get(name, {}))
    named = [(k, p) for k, p in _config_paths(config) if sandbox.outside([p])]
    assert not named, f"configs/{name}.py:{arg} names files outside the checkout: {named}"
    data = tasks.make_input(config)
    spec = data.spec()
    batch = next(iter(data.train(0, 1)))
    assert set(spec.elements) <= set(batch), (sorted(spec.elements), sorted(batch))
    assert _opened, "nothing was recorded: the audit hook is not watching"
    assert not sandbox.outside(_opened), f"configs/{name}.py:{arg} read {sandbox.outside(_opened)}"


def test_the_check_sees_data_read_beside_the_checkout(test_data, sandbox):
    """The control: the real-scene geo config reads the shared data, and the sandbox names it."""
    config = load_config("geo", "runlocal,data=shared", **{"input.data_root": str(test_data)})
    tasks.make_input(config).scenes
    assert any(p.startswith(str(test_data)) for p in sandbox.outside(_opened)), sorted(set(_opened))[:20]
