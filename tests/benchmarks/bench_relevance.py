"""Benchmark: one-pass grad × act relevance for all layers vs a plain forward+backward and vs per-layer passes.

On the same model and batches, in one run:

  (a) relevance     ``GradXActRelevance.add`` — one forward + one backward for every layer's mlp.hook_post
  (b) plain         forward + ``loss.backward()`` on the parameters (the cost of one training step's gradients)
  (c) naive         one forward + one backward per layer, each differentiating only that layer's activation
                    (parameters frozen as in (a), so the difference is only the number of passes)
  (d) captum        captum's ``LayerGradientXActivation`` over the same ``mlp.hook_post`` modules of every layer
                    in one call, with the same per-example loss as (a); skipped with a message when captum is
                    not installed (``pip install -e ".[bench]"``)

It prints the median seconds of each (over ``--repeats`` after ``--warmup``), the ratio a/b (target
≤ 1.10), the speed-up c/a, the ratio a/d (target ≤ 1.0) with the Pearson r of the (a) and (d) scores
(target ≥ 0.9999), and checks that (a) and (c) give the same scores.

    python tests/benchmarks/bench_relevance.py                       # random LLaMA-shaped model, CPU, < 2 min
    python tests/benchmarks/bench_relevance.py --layers 12 --d-mlp 2048 --batch 16 --seq 128
    python tests/benchmarks/bench_relevance.py --model /path/to/hf_model_folder --device cuda
    python tests/benchmarks/bench_relevance.py --smollm-shape --skip-naive    # SmolLM2-135M's shape, random weights

The default model is a randomly initialised ``LlamaForCausalLM`` (6 layers, d_model 256, d_mlp 1024)
saved with a small BPE tokenizer to a temp folder and loaded with ``TransformerBridge.boot_transformers``.
CPU runs use one thread by default (``--threads``): on a shared machine several threads per process
oversubscribe the cores and single timings then vary by 5x.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for tests.tiny_models (the tokenizer)

from _bench import add_model_arguments, print_medians, time_interleaved, timed  # noqa: E402,F401 - timed re-exported
from tl_taskmap.evaluate import answer_nll  # noqa: E402
from tl_taskmap.models import TokenBatch, as_adapter  # noqa: E402
from tl_taskmap.neurons.attribution import GradXActRelevance, _relevance_mode, answer_nll_at_answers, position_mask  # noqa: E402


def build_random_llama(args: argparse.Namespace, folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import tokenizer

    tok = tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_mlp, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, max_position_embeddings=max(args.seq, 64),
        num_key_value_heads=3 if getattr(args, "smollm_shape", False) else (getattr(args, "kv_heads", None) or args.heads),
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_batches(adapter: Any, args: argparse.Namespace) -> list[TokenBatch]:
    """Random tokens; the last ``--answer-len`` real tokens of each row are the answer. Every other row
    is left-padded by a quarter of the sequence so padding is exercised."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.batches):
        tokens = torch.randint(3, min(adapter.d_vocab, 320), (args.batch, args.seq), generator=generator)
        mask = torch.ones(args.batch, args.seq, dtype=torch.long)
        mask[1::2, : args.seq // 4] = 0
        tokens[mask == 0] = 0
        target = torch.zeros(args.batch, args.seq, dtype=torch.bool)
        target[:, -args.answer_len :] = True
        batches.append(TokenBatch(tokens, mask, target, "left"))
    return batches


def load_model_and_batches(args: argparse.Namespace, prefix: str) -> tuple[Any, Any, list[TokenBatch]]:
    """The model of ``--model`` (default: a random LLaMA-shaped one) as a TransformerBridge in eval mode, its adapter, the batches."""
    from transformer_lens.model_bridge import TransformerBridge

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        folder = Path(args.model) if args.model else build_random_llama(args, Path(tmp))
        model = TransformerBridge.boot_transformers(str(folder), device=args.device)
    model.eval()
    adapter = as_adapter(model)
    return model, adapter, make_batches(adapter, args)


def run_relevance(adapter: Any, batches: list[TokenBatch]) -> torch.Tensor:
    estimator = GradXActRelevance(adapter)
    for batch in batches:
        estimator.add(batch)
    return estimator.result_.sum_abs


def run_plain(adapter: Any, batches: list[TokenBatch]) -> None:
    model = adapter.model
    model.eval()
    for batch in batches:
        loss = answer_nll(adapter.forward(batch), batch).sum()
        loss.backward()
    model.zero_grad(set_to_none=True)


def run_naive(adapter: Any, batches: list[TokenBatch]) -> torch.Tensor:
    scores = torch.zeros(adapter.n_layers, adapter.d_mlp, dtype=torch.float64)
    for batch in batches:
        weight = position_mask(batch.to(adapter.device), "answer").float()[..., None]
        for layer in range(adapter.n_layers):
            store = {}

            def grab(act: torch.Tensor, hook: Any) -> torch.Tensor:
                act = act if act.requires_grad else act.detach().requires_grad_(True)
                store["act"] = act
                return act

            with _relevance_mode(adapter.model), adapter.hooks([(adapter.hook_name(layer, "mlp_post"), grab)]):
                loss = answer_nll(adapter.forward(batch), batch).sum()
                (grad,) = torch.autograd.grad(loss, store["act"])
            scores[layer] += (grad * store["act"].detach() * weight).abs().sum((0, 1), dtype=torch.float64).cpu()
    return scores


def run_captum(adapter: Any, batches: list[TokenBatch]) -> torch.Tensor:
    """captum's multi-layer LayerGradientXActivation on the same hook points, loss and counted positions."""
    from captum.attr import LayerGradientXActivation

    layers = [adapter.hook_point(adapter.hook_name(layer, "mlp_post")) for layer in range(adapter.n_layers)]

    def forward(tokens: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        batch = TokenBatch(tokens, attention_mask, target_mask, "left")
        return answer_nll_at_answers(adapter.forward(batch), batch)

    method = LayerGradientXActivation(forward, layers)
    scores = torch.zeros(adapter.n_layers, adapter.d_mlp, dtype=torch.float64)
    adapter.model.eval()
    for batch in batches:
        batch = batch.to(adapter.device)
        weight = position_mask(batch, "answer").float()[..., None]
        attributions = method.attribute(batch.tokens, additional_forward_args=(batch.attention_mask, batch.target_mask))
        for layer, attr in enumerate(attributions):
            scores[layer] += (attr.detach() * weight).abs().sum((0, 1), dtype=torch.float64).cpu()
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, heads=4, repeats=3, model_help="a local Hugging Face model folder (default: a random LLaMA-shaped model)")
    parser.add_argument("--skip-naive", action="store_true", help="skip (c), which costs n_layers passes")
    parser.add_argument("--smollm-shape", action="store_true",
                        help="a random model of SmolLM2-135M's shape: 30 layers, d_model 576, d_mlp 1536, 9 heads (3 kv), vocab 49152")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads; 1 by default because on a shared CPU more threads oversubscribe "
                             "the cores and timings swing wildly; 0 keeps torch's choice")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smollm_shape:
        args.layers, args.d_model, args.d_mlp, args.heads, args.vocab = 30, 576, 1536, 9, 49152

    model, adapter, batches = load_model_and_batches(args, "bench_relevance_")
    device = adapter.device
    print(f"{adapter}\n{args.batches} batches of {args.batch} x {args.seq} tokens, answer {args.answer_len} tokens, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    methods: dict[str, Callable[[], Any]] = {
        "relevance (a)": lambda: run_relevance(adapter, batches),
        "plain fwd+bwd (b)": lambda: run_plain(adapter, batches),
    }
    if not args.skip_naive:
        methods["naive per-layer (c)"] = lambda: run_naive(adapter, batches)
    try:
        import captum  # noqa: F401

        methods["captum (d)"] = lambda: run_captum(adapter, batches)
    except ImportError:
        print("captum is not installed: skipping (d); install it with `pip install -e \".[bench]\"`")
    times, outputs = time_interleaved(methods, device, args.warmup, args.repeats)
    medians = print_medians(times)
    a, b = medians["relevance (a)"], medians["plain fwd+bwd (b)"]
    print(f"ratio a/b (relevance / plain forward+backward): {a / b:.3f}  (target <= 1.10)")
    if "naive per-layer (c)" in medians:
        c = medians["naive per-layer (c)"]
        same = torch.allclose(outputs["relevance (a)"], outputs["naive per-layer (c)"], rtol=1e-4, atol=1e-6 * float(outputs["relevance (a)"].max()))
        print(f"speed-up c/a (naive per-layer / one pass): {c / a:.2f}x  (same scores: {same})")
    if "captum (d)" in medians:
        d = medians["captum (d)"]
        x, y = outputs["relevance (a)"].flatten(), outputs["captum (d)"].flatten()
        r = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
        print(f"ratio a/d (relevance / captum LayerGradientXActivation): {a / d:.3f}  (target <= 1.0); "
              f"Pearson r of scores {r:.6f} (target >= 0.9999), max rel. diff {float(((x - y).abs() / x.abs().max()).max()):.2e}")


if __name__ == "__main__":
    main()
