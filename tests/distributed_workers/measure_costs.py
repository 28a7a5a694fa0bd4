"""Measure the per-example costs that docs/running_at_scale.md scales up to Llama-2-7B.

Runs on the CPU in one process: forward passes with capture, grad × act relevance (forward +
backward to the activations), the CKA/covariance updates of ``compare_models``, and the float64 work
at d=4096 (accumulator update, merge, eigendecomposition). Prints one JSON object.

Usage (from the repository root)::

    python tests/distributed_workers/measure_costs.py [--model embedded|tiny] [--tokens 128] [--examples 8]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch


def _timed(fn, repeat: int = 3) -> float:
    """Best of ``repeat`` runs after a warm-up (the minimum is the least disturbed by other load)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _model(kind: str):
    if kind == "embedded":
        from tl_taskmap.embedded import load_default_model

        return load_default_model()
    from tests import tiny_models

    return tiny_models.bridge("llama")


def _task(model, n: int, tokens: int):
    from tl_taskmap.tasks import Task

    words = "the quick brown fox jumps over the lazy dog while a great movie review says good or bad".split()
    tok = model.tokenizer
    prompts = []
    for i in range(n):
        text = " ".join(words[(i + j) % len(words)] for j in range(tokens * 2))
        ids = tok.encode(text, add_special_tokens=False)[: tokens - 1]  # + BOS = `tokens` tokens
        prompts.append(tok.decode(ids))
    return Task.from_lists("measure", prompts, [" yes"] * n, options=[" yes", " no"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded", choices=["embedded", "tiny"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    from tl_taskmap.activations import Capturer
    from tl_taskmap.models import as_adapter
    from tl_taskmap.neurons.attribution import relevance
    from tl_taskmap.stats.cka import StreamingLinearCKA
    from tl_taskmap.stats.spectral import StreamingCovariance

    model = _model(args.model)
    adapter = as_adapter(model)
    n_params = sum(p.numel() for p in model.parameters())
    task = _task(model, args.examples, args.tokens)
    n = len(task)  # one batch of n examples
    cap = Capturer(model, "resid_post", "last")
    fwd = _timed(lambda: cap.run_batch(task.prompts)) / n
    rel = _timed(lambda: relevance(model, task, batch_size=n)) / n

    def stats_cost(d: int, layers: int) -> dict:
        """compare_models' float64 work for one model pair at ``layers`` layers: per batch, and per task."""
        x, y = torch.randn(n, d), torch.randn(n, d)
        cka, cov = StreamingLinearCKA(d, d).add(x, y), StreamingCovariance(d).add(x)
        update = _timed(lambda: (cka.add(x, y), cov.add(x), cov.add(y)), 1)  # one pair + two spectra
        summary = _timed(lambda: (cka.cka(), cka.cka(debiased=True), cov.eigenvalues(), cov.eigenvalues()), 1)
        merge = _timed(lambda: StreamingLinearCKA.from_state_dict(cka.state_dict()).merge(cka), 1)
        return {"update_s_per_example": layers * update / n, "summary_s_per_task": layers * summary,
                "cka_merge_s_per_layer": merge}

    small = stats_cost(adapter.d_model, adapter.n_layers)
    out = {"model": args.model, "n_params": n_params, "n_layers": adapter.n_layers, "d_model": adapter.d_model,
           "tokens_per_example": args.tokens, "batch_size": n, "threads": torch.get_num_threads(),
           "forward_s_per_example": fwd, "relevance_fwd_bwd_s_per_example": rel, "relevance_over_forward": rel / fwd,
           "cpu_flops_per_s_forward": 2 * n_params * args.tokens / fwd,
           "stats_this_model": small, "stats_update_over_two_forwards": small["update_s_per_example"] / (2 * fwd),
           "stats_d4096_one_layer": stats_cost(4096, 1)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
