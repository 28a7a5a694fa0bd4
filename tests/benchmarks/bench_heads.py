"""Benchmark: head + neuron relevance in one pass vs neuron relevance alone (target ratio ≤ 1.10).

On the same model and batches, in one run, interleaved:

  (a) neurons          ``GradXActRelevance.add`` — one forward + backward keeping every layer's mlp.hook_post
  (b) heads + neurons  ``GradXActHeadRelevance(neurons=True).add`` — the same pass also keeping attn.hook_z

It prints the median seconds of each (over ``--repeats`` after ``--warmup``), the ratio b/a and
checks that (b)'s neuron scores equal (a)'s.

    python tests/benchmarks/bench_heads.py                  # random LLaMA-shaped GQA model, CPU, < 1 min
    python tests/benchmarks/bench_heads.py --small          # CI size
    python tests/benchmarks/bench_heads.py --model /path/to/hf_model_folder --device cuda

The default model is a randomly initialised ``LlamaForCausalLM`` (6 layers, d_model 256, d_mlp 1024,
8 query / 2 key-value heads) loaded with ``TransformerBridge.boot_transformers``; batches come from
``bench_relevance.make_batches`` (random tokens, half the rows left-padded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import add_model_arguments, print_medians, time_interleaved  # noqa: E402
from bench_relevance import load_model_and_batches  # noqa: E402
from tl_taskmap.neurons.head_attribution import GradXActHeadRelevance  # noqa: E402
from tl_taskmap.neurons.attribution import GradXActRelevance  # noqa: E402


def run_neurons(adapter: Any, batches: list) -> torch.Tensor:
    est = GradXActRelevance(adapter)
    for batch in batches:
        est.add(batch)
    return est.result_.sum_abs


def run_both(adapter: Any, batches: list) -> torch.Tensor:
    est = GradXActHeadRelevance(adapter, neurons=True)
    for batch in batches:
        est.add(batch)
    return est.neuron_result_.sum_abs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, heads=8, kv_heads=2, repeats=7,
                        model_help="a local Hugging Face model folder (default: a random LLaMA-shaped GQA model)")
    parser.add_argument("--small", action="store_true", help="CI size: 4 layers, d_model 128, 3 repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: stable timings on a shared CPU; 0 keeps torch's)")
    args = parser.parse_args()
    if args.small:
        args.layers, args.d_model, args.d_mlp, args.vocab, args.repeats = 4, 128, 512, 1024, 5
    if args.threads:
        torch.set_num_threads(args.threads)

    model, adapter, batches = load_model_and_batches(args, "bench_heads_")
    print(f"{adapter}\n{args.batches} batches of {args.batch} x {args.seq} tokens, n_heads={model.cfg.n_heads}, "
          f"n_key_value_heads={getattr(model.cfg, 'n_key_value_heads', None)}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    methods: dict[str, Callable[[], Any]] = {
        "neurons (a)": lambda: run_neurons(adapter, batches),
        "heads + neurons (b)": lambda: run_both(adapter, batches),
    }
    times, outputs = time_interleaved(methods, adapter.device, args.warmup, args.repeats, alternate=True)
    medians = print_medians(times)
    a, b = medians["neurons (a)"], medians["heads + neurons (b)"]
    same = torch.allclose(outputs["neurons (a)"], outputs["heads + neurons (b)"], rtol=1e-5, atol=0)
    print(f"ratio b/a (heads + neurons / neurons alone): {b / a:.3f}  (target <= 1.10); same neuron scores: {same}")


if __name__ == "__main__":
    main()
