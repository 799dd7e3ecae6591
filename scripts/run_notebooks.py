"""Executes the notebooks in colab/ in place and saves them with their outputs.

    .venv/bin/python scripts/run_notebooks.py [NAME ...]     # default: every colab/*.ipynb

Each notebook runs top to bottom in a kernel of this interpreter (a kernelspec written for it, found
through JUPYTER_PATH), with 2 simulated CPU devices, EOJAX_TEST_DATA unset (the notebooks run on what
eojax itself brings) and its workdir (EOJAX_<NAME>_WORKDIR) a fixed, emptied folder under the temp
directory, so that printed paths do not change between runs. What changes on every run is dropped
before saving: cell execution timings, the kernel's language version, widget state. Pictures stay as
PNG outputs. A notebook is written (to a temporary name, then renamed) only when every cell ran; a
failing cell leaves the stored notebook as it was and the script exits with 1.

tests/test_notebook.py uses `kernelspec`, `execute` and `stored_problems` from here: it re-executes a
copy of each notebook and checks that the stored one holds the outputs of a complete run.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shutil
import sys
import tempfile

import nbclient
import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = "eojax-notebooks"


def workdir_variable(name: str) -> str:
    """The variable a notebook reads its workdir from: EOJAX_<NAME>_WORKDIR."""
    return f"EOJAX_{name.upper()}_WORKDIR"


def kernelspec(root: str, env: dict, devices: int = 2) -> str:
    """Writes a kernelspec for *this* interpreter under root/kernels (a fresh machine has no registered
    kernel, and a user-level 'python3' one could point at another Python) -> its name. Put root on
    JUPYTER_PATH for the client to find it."""
    spec_dir = os.path.join(root, "kernels", KERNEL)
    os.makedirs(spec_dir, exist_ok=True)
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "eojax (this interpreter)",
        "language": "python",
        # Overrides what the kernel inherits (a test process asks for 8 devices).
        "env": {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {flags}".strip(),
                "JAX_PLATFORMS": "cpu", "MPLBACKEND": "module://matplotlib_inline.backend_inline", **env},
    }
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump(spec, f)
    return KERNEL


def execute(nb, kernel_name: str, timeout: int = 600):
    """Runs every cell of `nb` (in memory, from empty outputs: what a notebook held before never counts)
    in the kernel `kernel_name`, from the repository root -> the client (its cells carry their timings
    until `strip_volatile`). Raises CellExecutionError naming the cell if one fails."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=timeout, startup_timeout=120,
                                     record_timing=True, resources={"metadata": {"path": REPO}})
    client.execute()
    return client


def cell_seconds(cell) -> float | None:
    """How long a code cell took, from nbclient's timing metadata."""
    timing = cell.get("metadata", {}).get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (start and end):
        return None
    parse = lambda t: datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def strip_volatile(nb, kernelspec_before: dict) -> None:
    """Drops what differs between two runs of the same notebook besides the outputs themselves."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("collapsed", None)
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = kernelspec_before  # the executing kernel is this machine's, not Colab's
    nb.metadata["language_info"] = {"name": "python"}


def stored_problems(nb) -> list[str]:
    """Why a stored notebook is not the saved result of one complete run ([] when it is): every code
    cell with code has an execution count, in order from 1, no error output, and the notebook shows at
    least one picture."""
    problems, counts, pictures = [], [], 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        if not isinstance(cell.get("execution_count"), int):
            problems.append(f"cell {i} was not run (no execution count)")
        else:
            counts.append(cell.execution_count)
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                problems.append(f"cell {i} holds an error: {out.get('ename')}: {out.get('evalue')}")
            pictures += "image/png" in out.get("data", {})
        if "execution" in cell.get("metadata", {}):
            problems.append(f"cell {i} keeps its execution timings (scripts/run_notebooks.py strips them)")
    if counts and counts != list(range(1, len(counts) + 1)):
        problems.append(f"execution counts {counts} are not one run top to bottom")
    if not pictures:
        problems.append("no PNG output")
    return problems


def run(path: str, scratch: str, timeout: int) -> bool:
    name = os.path.splitext(os.path.basename(path))[0]
    workdir = os.path.join(scratch, name)
    shutil.rmtree(workdir, ignore_errors=True)
    kernel_root = tempfile.mkdtemp(prefix="eojax_kernel_")
    try:
        kernel = kernelspec(kernel_root, {workdir_variable(name): workdir})
        os.environ["JUPYTER_PATH"] = kernel_root
        nb = nbformat.read(path, as_version=4)
        kernelspec_before = dict(nb.metadata.get("kernelspec", {}))
        try:
            execute(nb, kernel, timeout)
        except nbclient.exceptions.CellExecutionError as e:
            print(f"{path}: a cell failed; the stored notebook is unchanged:\n{str(e)[-2000:]}", file=sys.stderr)
            return False
        times = [(i, cell_seconds(c)) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        strip_volatile(nb, kernelspec_before)
        problems = stored_problems(nb)
        if problems:
            print(f"{path}: not saved: {'; '.join(problems)}", file=sys.stderr)
            return False
        tmp = f"{path}.tmp"
        nbformat.write(nb, tmp)
        os.replace(tmp, path)
        total = sum(t or 0.0 for _, t in times)
        print(f"{path}: saved with outputs ({os.path.getsize(path):,} bytes), cells took {total:.0f} s: "
              + ", ".join(f"{i}: {t:.1f}" for i, t in times if t is not None))
        return True
    finally:
        shutil.rmtree(kernel_root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="notebook names (seg, vsat, ...); default: all")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args()
    paths = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))
    if args.names:
        by_name = {os.path.splitext(os.path.basename(p))[0]: p for p in paths}
        unknown = [n for n in args.names if n not in by_name]
        if unknown:
            parser.error(f"no notebook {unknown} in colab/; there are {sorted(by_name)}")
        paths = [by_name[n] for n in args.names]
    os.environ.pop("EOJAX_TEST_DATA", None)  # the notebooks run on what eojax itself brings
    scratch = os.path.join(tempfile.gettempdir(), "eojax_notebooks")
    failed = [p for p in paths if not run(p, scratch, args.timeout)]
    if failed:
        sys.exit(f"failed: {', '.join(os.path.basename(p) for p in failed)}")


if __name__ == "__main__":
    main()
