"""Execute every tutorial notebook in place and save its outputs (so the repository shows results and figures).

Each notebook runs top to bottom in a fresh kernel of *this* interpreter, in a temporary working folder
(files the notebooks write land there, not in the repository). Outputs are saved into the notebook;
execution timestamps are not, so re-running changes only what the notebook printed. The first cell's
``*Run time: ...*`` line is rewritten (or added) with the measured time and this machine's core count.

Needs the embedded model and tasks (``python -m tl_taskmap.setup_assets``) and ``nbclient``,
``nbformat``, ``ipykernel`` (the ``test`` extra). Stops at the first failing notebook (exit status 1)
and leaves that notebook unchanged.

Example:
    $ python scripts/run_tutorials.py                      # all of tutorials/*.ipynb
    $ python scripts/run_tutorials.py tutorials/03_*.ipynb # one
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_TIME = re.compile(r"\*Run time: [^*]*\*")


def _kernel(prefix: Path) -> str:
    """A ``python3`` kernelspec that runs this interpreter, first on ``JUPYTER_PATH`` (no other Python is picked up)."""
    from ipykernel.kernelspec import install

    install(kernel_name="python3", prefix=str(prefix))
    os.environ["JUPYTER_PATH"] = str(prefix / "share" / "jupyter") + os.pathsep + os.environ.get("JUPYTER_PATH", "")
    return "python3"


def run_time_line(seconds: float, cores: int) -> str:
    """The first cell's run-time sentence.

    Example:
        >>> run_time_line(150, 2)
        "*Run time: about 3 min on a 2-core CPU, model loading included (the last cell prints this run's time).*"
    """
    minutes = max(1, round(seconds / 60))
    return f"*Run time: about {minutes} min on a {cores}-core CPU, model loading included (the last cell prints this run's time).*"


def execute(path: Path, kernel_name: str, cell_timeout: int) -> float:
    """Run one notebook and write it back with outputs; returns its wall time in seconds."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="tl_taskmap_tutorial_") as workdir:
        client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=cell_timeout, record_timing=False,
                                         resources={"metadata": {"path": workdir}})
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    first = nb.cells[0]
    if first.cell_type == "markdown":  # the title cell states the run time (added when missing)
        line = run_time_line(seconds, os.cpu_count() or 1)
        first.source = RUN_TIME.sub(line, first.source) if RUN_TIME.search(first.source) else f"{first.source.rstrip()}\n\n{line}"
    tmp = path.with_name(f".{path.name}.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, path)  # atomic: an interrupted run never leaves half a notebook
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: tutorials/*.ipynb)")
    parser.add_argument("--cell-timeout", type=int, default=3600,
                        help="hang guard per cell in seconds (default: 3600; cells take seconds to minutes)")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "tutorials").glob("*.ipynb"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would only add noise to the saved outputs
    with tempfile.TemporaryDirectory(prefix="tl_taskmap_kernel_") as prefix:
        kernel_name = _kernel(Path(prefix))
        for path in notebooks:
            print(f"running {path} ...", flush=True)
            try:
                seconds = execute(path, kernel_name, args.cell_timeout)
            except Exception as err:  # noqa: BLE001 - report which notebook failed, leave it unchanged
                print(f"{path}: failed: {type(err).__name__}: {str(err)[-2000:]}", file=sys.stderr)
                return 1
            print(f"{path}: {seconds:.0f} s, outputs saved", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
