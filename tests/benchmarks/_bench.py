"""What the relevance benchmarks share: the random model's options, timing, interleaved repeats, medians.

The benchmarks import it as ``_bench`` (run as scripts, their folder is on ``sys.path``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, Optional

import torch


def add_model_arguments(parser: argparse.ArgumentParser, *, heads: int, repeats: int, model_help: str,
                        kv_heads: Optional[int] = None) -> None:
    """The options of the random LLaMA-shaped model, its batches and the repeats (``--kv-heads`` only when given a default)."""
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-mlp", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=heads)
    if kv_heads is not None:
        parser.add_argument("--kv-heads", type=int, default=kv_heads)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--answer-len", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2, help="batches per timed run")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds ``fn()`` takes (CUDA synchronised on both sides) and its output."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def time_interleaved(methods: dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int, *,
                     alternate: bool = False) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Run every method once per repeat, interleaved so that load drift affects all alike (``alternate``: the order
    reverses every other repeat); the first ``warmup`` repeats are not timed. Returns ``(times, last outputs)``."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    outputs: dict[str, Any] = {}
    for repeat in range(warmup + repeats):
        order = list(methods) if not alternate or repeat % 2 == 0 else list(reversed(methods))
        for name in order:
            seconds, outputs[name] = timed(methods[name], device)
            if repeat >= warmup:
                times[name].append(seconds)
    return times, outputs


def print_medians(times: dict[str, list[float]]) -> dict[str, float]:
    """Print each method's median seconds and range; returns the medians."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:<22} median {value:8.3f} s  [{min(times[name]):.3f} .. {max(times[name]):.3f}]")
    return medians
