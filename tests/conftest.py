import os

import pytest
import torch

from tests import tiny_models


@pytest.fixture(autouse=True)
def _threads(request):
    """One thread for the tiny-model tests (threading overhead dominates tiny ops); all cores for real-model tests."""
    before = torch.get_num_threads()
    torch.set_num_threads((os.cpu_count() or 1) if request.node.get_closest_marker("real_model") else 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for module-scoped fixtures that run tiny models (they are set up before the per-test
    ``_threads``; tiny models run far faster on one thread, above all on a busy CI machine); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=tiny_models.MODEL_KINDS)
def any_model(request):
    """Every tiny model: both backends (HookedTransformer only where TransformerLens has it), both MLP kinds."""
    kind = request.param
    if kind.startswith("hooked") and not tiny_models.has_hooked_transformer():
        pytest.skip("this TransformerLens version has no HookedTransformer (4.x); CI covers it with 3.x")
    return tiny_models.make(kind)


@pytest.fixture
def bridge_llama():
    return tiny_models.bridge("llama")


@pytest.fixture
def bridge_gpt2():
    return tiny_models.bridge("gpt2")


@pytest.fixture
def tiny_tasks():
    """The shared toy suite (``tests/helpers.py``): two multiple-choice tasks in two clusters."""
    from tests.helpers import tiny_tasks as make

    return make()
