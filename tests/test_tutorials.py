"""Every tutorial notebook executes top to bottom on the embedded model (offline), so none can rot.

The kernel is this interpreter: a ``python3`` kernelspec pointing at ``sys.executable`` is installed
into a temporary prefix and put first on ``JUPYTER_PATH``, so a user-wide kernelspec of another
Python can never be picked up. Notebooks run in a temporary folder (their files land there).
"""

import os
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


def test_tutorials_exist_and_are_committed_without_outputs():
    names = [p.name for p in TUTORIALS]
    assert names == ["01_capture_and_cka_layer_map.ipynb", "02_task_neurons_and_overlap.ipynb", "03_ablation_from_the_repl.ipynb",
                     "04_masked_finetuning_and_ncft.ipynb", "05_chaining_with_transformerlens.ipynb",
                     "06_heads.ipynb"]
    for path in TUTORIALS:
        nb = nbformat.read(path, as_version=4)
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs committed"


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_executes(path, kernel_name, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=600, resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()
    print(f"{path.name}: {time.perf_counter() - start:.0f} s")
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.get("output_type") == "error"]
    assert not errors
