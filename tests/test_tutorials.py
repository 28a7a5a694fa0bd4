"""Every tutorial notebook is committed with its outputs and executes top to bottom on the embedded model (offline).

The kernel is this interpreter: a ``python3`` kernelspec pointing at ``sys.executable`` is installed
into a temporary prefix and put first on ``JUPYTER_PATH``, so a user-wide kernelspec of another
Python can never be picked up. Notebooks run in a temporary folder (their files land there).
"""

import os
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.ipynb"))


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory, monkeypatch_module):
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("kernel")
    install(kernel_name="python3", prefix=str(prefix))  # kernel.json runs sys.executable -m ipykernel_launcher
    monkeypatch_module.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter") + os.pathsep + os.environ.get("JUPYTER_PATH", ""))
    monkeypatch_module.setenv("MPLBACKEND", "Agg")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("TRANSFORMERS_OFFLINE", "1")
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert Path(spec.argv[0]).resolve() == Path(sys.executable).resolve(), spec.argv
    return "python3"


@pytest.fixture(scope="module")
def monkeypatch_module():
    patcher = pytest.MonkeyPatch()
    yield patcher
    patcher.undo()


SHARED_SETUP = ["01_capture_and_cka_layer_map.ipynb", "02_task_neurons_and_overlap.ipynb", "03_ablation_from_the_repl.ipynb",
                "04_masked_finetuning_and_ncft.ipynb", "05_chaining_with_transformerlens.ipynb"]


def test_tutorials_exist_with_a_title_a_run_time_and_the_shared_setup():
    names = [p.name for p in TUTORIALS]
    assert set(SHARED_SETUP) <= set(names), names
    for path in TUTORIALS:
        nb = nbformat.read(path, as_version=4)
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
        assert re.search(r"\*Run time: about \d+ min on a \d+-core CPU", nb.cells[0].source), \
            f"{path.name}: the first cell states no measured run time (run scripts/run_tutorials.py)"
        if path.name in SHARED_SETUP:
            code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
            assert "from tl_taskmap.tutorial import setup" in code and "load_default_model" not in code, path.name


def test_tutorials_are_committed_with_outputs():
    """Browsing the repository shows results: every code cell ran (in order), and figures are saved as images."""
    for path in TUTORIALS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        counts = [c.execution_count for c in code]
        assert None not in counts, f"{path.name}: cells without outputs; run `python scripts/run_tutorials.py` and commit"
        assert counts == sorted(counts), f"{path.name}: cells were run out of order"
        outputs = [o for c in code for o in c.outputs]
        assert not [o for o in outputs if o.get("output_type") == "error"], f"{path.name}: an error output is committed"
        assert outputs, f"{path.name}: no outputs"
        if any("plot" in c.source for c in code):  # a notebook that draws shows its figures
            assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name}: no figure in the outputs"
        assert not [o for o in outputs if "TqdmWarning" in str(o.get("text", ""))], f"{path.name}: a TqdmWarning is committed"


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_executes(path, kernel_name, tmp_path):
    nb = nbformat.read(path, as_version=4)
    # timeout: a hang guard per cell, not a speed target (a busy machine can be 10x slower)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=3600, resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()
    print(f"{path.name}: {time.perf_counter() - start:.0f} s")
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.slow
def test_importing_tl_taskmap_in_a_kernel_shows_no_tqdm_warning(kernel_name, tmp_path):
    """Without ipywidgets, tqdm.auto warns "IProgress not found" in Jupyter; tl_taskmap keeps it out of the cell."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import tl_taskmap\nfrom tqdm.auto import tqdm\nprint('ok')")])
    nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=3600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(str(o.get("text", "")) for o in nb.cells[0].outputs)
    assert "ok" in text and "IProgress" not in text, text
