import pytest

from tests import tiny_models


def pytest_collection_modifyitems(config, items):
    pass


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
