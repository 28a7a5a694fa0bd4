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
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_relevance import make_batches, timed  # noqa: E402
from tl_taskmap.models import as_adapter  # noqa: E402
from tl_taskmap.neurons.head_attribution import GradXActHeadRelevance  # noqa: E402
from tl_taskmap.neurons.attribution import GradXActRelevance  # noqa: E402


def build_random_gqa_llama(args: argparse.Namespace, folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import tokenizer

    tok = tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_mlp, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq, 64),
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


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
    parser.add_argument("--model", help="a local Hugging Face model folder (default: a random LLaMA-shaped GQA model)")
    parser.add_argument("--small", action="store_true", help="CI size: 4 layers, d_model 128, 3 repeats")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-mlp", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--answer-len", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2, help="batches per timed run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: stable timings on a shared CPU; 0 keeps torch's)")
    args = parser.parse_args()
    if args.small:
        args.layers, args.d_model, args.d_mlp, args.vocab, args.repeats = 4, 128, 512, 1024, 5
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformer_lens.model_bridge import TransformerBridge

    with tempfile.TemporaryDirectory(prefix="bench_heads_") as tmp:
        folder = Path(args.model) if args.model else build_random_gqa_llama(args, Path(tmp))
        model = TransformerBridge.boot_transformers(str(folder), device=args.device)
    model.eval()
    adapter = as_adapter(model)
    batches = make_batches(adapter, args)
    print(f"{adapter}\n{args.batches} batches of {args.batch} x {args.seq} tokens, n_heads={model.cfg.n_heads}, "
          f"n_key_value_heads={getattr(model.cfg, 'n_key_value_heads', None)}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    methods: dict[str, Callable[[], Any]] = {
        "neurons (a)": lambda: run_neurons(adapter, batches),
        "heads + neurons (b)": lambda: run_both(adapter, batches),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    outputs: dict[str, Any] = {}
    for repeat in range(args.warmup + args.repeats):
        order = list(methods) if repeat % 2 == 0 else list(reversed(methods))  # interleaved, alternating order
        for name in order:
            seconds, outputs[name] = timed(methods[name], adapter.device)
            if repeat >= args.warmup:
                times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:<22} median {value:8.3f} s  [{min(times[name]):.3f} .. {max(times[name]):.3f}]")
    a, b = medians["neurons (a)"], medians["heads + neurons (b)"]
    same = torch.allclose(outputs["neurons (a)"], outputs["heads + neurons (b)"], rtol=1e-5, atol=0)
    print(f"ratio b/a (heads + neurons / neurons alone): {b / a:.3f}  (target <= 1.10); same neuron scores: {same}")


if __name__ == "__main__":
    main()
