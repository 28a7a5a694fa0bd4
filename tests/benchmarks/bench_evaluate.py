"""Benchmark: multiple-choice scoring and greedy generation against their physical baselines.

Measured in one process with 1 torch thread, interleaved repeats, medians (ratios, not seconds, are
what transfers across machines):

* **MC scoring** — ``evaluate_task`` on a 4-option task, cached (default) and the full reference
  (``fast=False``), each divided by one forward pass over the prompts alone (same batches).
  Target (issue 13): cached <= 1.5x.
* **Generation** — ``greedy_generate`` with the KV cache (default) and without, each divided by
  Hugging Face ``generate`` with its cache on the same weights (a plain HF model loaded from the same
  folder), stopping on the same tokens (EOS and every token whose text holds a newline). The texts
  must be identical. Target: cached <= 1.3x.
* **Few-shot generation task** — ``evaluate_task`` on the built-in ``past_tense`` task (two shared
  demonstrations before every prompt): the one-pass path (shared prefix once per batch; loss and greedy
  output from one pass) against the path before it (a loss pass, then cached greedy decoding from a
  second prompt pass, no prefix sharing), each divided by one forward pass over the prompts alone.
  Predictions must be identical and losses equal to 1e-4.

The model is the embedded SmolLM2-135M-Instruct when it is set up, else (or with ``--random``) a
random LLaMA-shaped model of the same shape built locally (throughput does not depend on weights).

    python tests/benchmarks/bench_evaluate.py --examples 16 --repeats 5
    python tests/benchmarks/bench_evaluate.py --random --layers 4    # quick smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from tl_taskmap.evaluate import evaluate_task, greedy_generate
from tl_taskmap.models import as_adapter
from tl_taskmap.tasks import Task

WORDS = ("the a quick brown fox jumps over lazy dog good bad movie review great awful cat sat on mat and then it was not very "
         "really quite simple question answer true false statement").split()
OPTIONS = [" yes", " no", " maybe", " unknown"]


def load_models(random_model: bool, n_layers: int) -> tuple[Any, Any, str]:
    """(bridge, plain HF model on the same weights, description)."""
    from transformers import AutoModelForCausalLM
    from transformer_lens.model_bridge import TransformerBridge

    if not random_model:
        try:
            from tl_taskmap import embedded

            folder = embedded.prepare_default_model()
            bridge = embedded.load_default_model()
            hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
            return bridge, hf, "embedded SmolLM2-135M-Instruct"
        except Exception as err:  # not set up: fall back to the random model
            print(f"(embedded model unavailable: {err}; using a random model)")
    from transformers import LlamaConfig, LlamaForCausalLM

    from tl_taskmap import embedded

    folder = Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=n_layers, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    try:  # the embedded tokenizer when present, else GPT-2's from the local cache
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(embedded.prepare_default_model()))
    except Exception:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained("gpt2")
    tok.save_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")
    bridge.eval()
    hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    return bridge, hf, f"random LLaMA (SmolLM2 shape, {n_layers} layers)"


def make_prompts(n: int, n_words: int, seed: int = 1) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n_words + int(k) % 7,), generator=gen)) + " Answer:"
            for k, _ in enumerate(range(n))]


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def newline_token_ids(tok: Any) -> list[int]:
    ids = [i for i in range(len(tok)) if "\n" in tok.decode([i])]
    return ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--prompt-words", type=int, default=40, help="words per prompt (plus up to 6)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--random", action="store_true", help="use a random SmolLM2-shaped model")
    parser.add_argument("--layers", type=int, default=30, help="layers of the random model")
    parser.add_argument("--options", nargs="+", default=OPTIONS, help="answer options of the MC task (leading spaces kept)")
    parser.add_argument("--skip", choices=["mc", "generation", "few-shot"], nargs="*", default=[])
    parser.add_argument("--no-reference", action="store_true", help="do not time the slow reference paths (fast=False, use_cache=False)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bridge, hf, what = load_models(args.random, args.layers)
    adapter = as_adapter(bridge)
    prompts = make_prompts(args.examples, args.prompt_words)
    n_tok = [int(adapter.tokenize([p]).attention_mask.sum()) for p in prompts]
    print(f"model: {what}; {args.examples} prompts of {min(n_tok)}-{max(n_tok)} tokens, batch {args.batch_size}, "
          f"1 thread, median of {args.repeats} interleaved repeats")

    if "mc" not in args.skip:
        options = list(args.options)
        task = Task.from_lists("bench", prompts, [options[i % len(options)] for i in range(len(prompts))], options=options)
        n_opt_tok = [len(adapter.tokenizer.encode(o, add_special_tokens=False)) for o in options]

        def prompt_forward() -> None:
            with torch.no_grad():
                for s in range(0, len(prompts), args.batch_size):
                    adapter.forward(adapter.tokenize(prompts[s : s + args.batch_size]))

        fast = evaluate_task(bridge, task, batch_size=args.batch_size)
        slow = evaluate_task(bridge, task, batch_size=args.batch_size, fast=False)
        diff = max(abs(a - b) for fa, sa in zip(fast.option_scores, slow.option_scores) for a, b in zip(fa, sa))
        fns = {"prompt forward": prompt_forward, "MC cached": lambda: evaluate_task(bridge, task, batch_size=args.batch_size),
               "MC full (reference)": lambda: evaluate_task(bridge, task, batch_size=args.batch_size, fast=False)}
        if args.no_reference:
            del fns["MC full (reference)"]
        t = interleaved(fns, args.repeats)
        base = t["prompt forward"]
        print(f"\nMC scoring, {len(options)} options of {n_opt_tok} tokens (max |cached - reference| option score {diff:.1e}):")
        for name, sec in t.items():
            print(f"  {name:22s} {sec:7.3f} s  {sec / base:5.2f}x prompt forward")
        print(f"  target: cached <= 1.5x -> {'met' if t['MC cached'] / base <= 1.5 else 'NOT met'}")

    if "generation" not in args.skip:
        tok = adapter.tokenizer
        stop_ids = newline_token_ids(tok)
        gen_prompts = prompts[: args.batch_size]
        batch = adapter.tokenize(gen_prompts, padding_side="left")

        def hf_generate() -> list[str]:
            with torch.no_grad():
                out = hf.generate(batch.tokens, attention_mask=batch.attention_mask, max_new_tokens=args.new_tokens, do_sample=False,
                                  eos_token_id=stop_ids, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stop_ids[-1])
            texts = []
            for row in out[:, batch.tokens.shape[1] :].tolist():
                cut = next((i for i, t in enumerate(row) if t in set(stop_ids)), len(row))
                texts.append(tok.decode(row[:cut]))
            return texts

        ours = lambda: greedy_generate(adapter, gen_prompts, args.new_tokens)  # noqa: E731
        uncached = lambda: greedy_generate(adapter, gen_prompts, args.new_tokens, use_cache=False)  # noqa: E731
        with torch.no_grad():
            same = ours() == hf_generate() and (args.no_reference or ours() == uncached())
            n_new = sum(len(tok.encode(s, add_special_tokens=False)) for s in ours())
        fns = {"HF generate (cache)": hf_generate, "ours, KV cache": ours, "ours, no cache": uncached}
        if args.no_reference:
            del fns["ours, no cache"]
        t = interleaved(fns, args.repeats)
        base = t["HF generate (cache)"]
        print(f"\ngreedy generation, {len(gen_prompts)} prompts x up to {args.new_tokens} new tokens ({n_new} generated); "
              f"identical text: {same}")
        for name, sec in t.items():
            print(f"  {name:22s} {sec:7.3f} s  {sec / base:5.2f}x HF generate")
        print(f"  target: KV cache <= 1.3x and identical text -> {'met' if t['ours, KV cache'] / base <= 1.3 and same else 'NOT met'}")

    if "few-shot" not in args.skip:
        few_shot(bridge, adapter, args)


def few_shot(bridge: Any, adapter: Any, args: Any) -> None:
    """The few-shot generation section (see the module doc)."""
    from tl_taskmap import prompt_cache
    from tl_taskmap.choice_scoring import option_logprob_sums
    from tl_taskmap.evaluate import greedy_generate
    from tl_taskmap.suite import default_suite

    try:
        task = default_suite(max_examples=args.examples, names=["past_tense"]).select(["past_tense"])[0].subset(args.examples, seed=0)
    except Exception as err:  # the built-in suite is not set up (python -m tl_taskmap.setup_assets)
        print(f"\nfew-shot generation task: skipped, the built-in past_tense task is unavailable ({err})")
        return
    prompts, targets = task.prompts, task.targets
    budget = max(len(adapter.tokenizer.encode(t, add_special_tokens=False)) for t in targets) + 2

    def prompt_forward() -> None:
        with torch.no_grad():
            for s in range(0, len(prompts), args.batch_size):
                adapter.forward(adapter.tokenize(prompts[s : s + args.batch_size]))

    def before() -> tuple[list[float], list[str]]:
        """The path before one-pass evaluation: a loss pass and a second prompt pass for cached greedy decoding."""
        saved, prompt_cache.MIN_SHARED_TOKENS = prompt_cache.MIN_SHARED_TOKENS, 10**9  # no prefix sharing
        try:
            losses, texts = [], []
            with torch.no_grad():
                for s in range(0, len(prompts), args.batch_size):
                    p, t = prompts[s : s + args.batch_size], targets[s : s + args.batch_size]
                    sums, counts = option_logprob_sums(adapter, p, [[x] for x in t])
                    losses += (-sums / counts).tolist()
                    texts += greedy_generate(adapter, p, budget)
            return losses, texts
        finally:
            prompt_cache.MIN_SHARED_TOKENS = saved

    now = evaluate_task(bridge, task, batch_size=args.batch_size)
    old_losses, old_texts = before()
    same = now.predictions == old_texts and max(abs(a - b) for a, b in zip(now.losses, old_losses)) < 1e-4
    t = interleaved({"prompt forward": prompt_forward, "one pass (now)": lambda: evaluate_task(bridge, task, batch_size=args.batch_size),
                     "loss + greedy (before)": before}, args.repeats)
    base = t["prompt forward"]
    shared = prompt_cache.run_prompts(adapter, prompts[: args.batch_size]).shared
    print(f"\nfew-shot generation task past_tense, {len(prompts)} examples ({shared} shared prefix tokens per batch), "
          f"exact match {now.metric_value:.2f}; identical predictions and losses: {same}")
    for name, sec in t.items():
        print(f"  {name:22s} {sec:7.3f} s  {sec / base:5.2f}x prompt forward")
    print(f"  one pass / before: {t['one pass (now)'] / t['loss + greedy (before)']:.2f}")


if __name__ == "__main__":
    main()
