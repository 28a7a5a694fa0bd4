"""Capture benchmark: overhead vs a plain forward, and peak memory vs N and sequence length.

Run: python tests/benchmarks/bench_capture.py [--small]

1. Speed: on the same batches, capture of 2 sites × all layers with last-token reduction vs a plain
   forward pass of the same model (target ratio ≤ 1.05).
1b. Early stop: capture of ``resid_post`` at layers 0..L/2-1 and at all L layers vs a plain forward
   (logits), medians of interleaved repeats (targets ≤ 0.65 and ≤ 0.95). Capture stops after the
   last requested hook point: no later blocks, no unembedding. ``--smollm-shape`` runs it on a
   random model with SmolLM2-135M's shape (30 layers, d_model 576, d_mlp 1536, vocab 49152).
2. Memory: peak RSS of capturing N examples, in fresh subprocesses, for two N and two sequence
   lengths; it should grow with N·sites·d_model (the reduced result), not with the sequence length.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

print = __import__("functools").partial(print, flush=True)


def build_model(folder: Path, n_layers: int, d_model: int, vocab_words: int = 200, d_mlp: int | None = None,
                vocab: int | None = None, heads: int = 8, kv_heads: int = 8) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests import tiny_models

    tok = tiny_models.tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab or len(tok), hidden_size=d_model, intermediate_size=d_mlp or 4 * d_model, num_hidden_layers=n_layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0, tie_word_embeddings=True)
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def prompts(n: int, words: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    vocab = "the quick brown fox jumps over lazy dog good bad movie great awful yes no".split()
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(words // 2, words))) for _ in range(n)]


def speed(folder: Path, batch: int, words: int, repeats: int) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    from tl_taskmap.activations import Capturer
    from tl_taskmap.models import as_adapter

    torch.set_grad_enabled(False)
    model = TransformerBridge.boot_transformers(str(folder), device="cpu")
    model.eval()
    adapter = as_adapter(model)
    capturer = Capturer(adapter, ["resid_post", "mlp_post"], "last")
    batches = [adapter.tokenize(p, padding_side="left") for p in [prompts(batch, words, s) for s in range(4)]]
    for b in batches:  # warm-up
        adapter.forward(b)
        capturer.run_batch(b)
    plain, cap = [], []
    for _ in range(repeats):
        for b in batches:
            t = time.perf_counter(); adapter.forward(b); plain.append(time.perf_counter() - t)
            t = time.perf_counter(); capturer.run_batch(b); cap.append(time.perf_counter() - t)
    p, c = statistics.median(plain), statistics.median(cap)
    print(f"speed: plain forward {p*1e3:.1f} ms/batch, capture (2 sites × {adapter.n_layers} layers, last token) {c*1e3:.1f} ms/batch")
    print(f"speed: ratio capture/plain = {c/p:.3f} (target ≤ 1.05)")


def early_stop_speed(folder: Path, batch: int, words: int, repeats: int) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    from tl_taskmap.activations import Capturer
    from tl_taskmap.models import as_adapter

    torch.set_grad_enabled(False)
    model = TransformerBridge.boot_transformers(str(folder), device="cpu")
    model.eval()
    adapter = as_adapter(model)
    n = adapter.n_layers
    half = Capturer(adapter, [(layer, "resid_post") for layer in range(n // 2)], "last")
    every = Capturer(adapter, "resid_post", "last")
    batches = [adapter.tokenize(p, padding_side="left") for p in [prompts(batch, words, s) for s in range(4)]]
    methods = {"plain": adapter.forward, "half": half.run_batch, "all": every.run_batch}
    for b in batches:  # warm-up
        for fn in methods.values():
            fn(b)
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):
        for b in batches:
            for name, fn in methods.items():  # interleaved, so load drift hits every method alike
                t = time.perf_counter(); fn(b); times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"early stop: plain forward {med['plain']*1e3:.1f} ms/batch; capture resid_post of layers 0..{n // 2 - 1} "
          f"{med['half']*1e3:.1f} ms, of all {n} layers {med['all']*1e3:.1f} ms")
    print(f"early stop: ratio half/plain = {med['half']/med['plain']:.3f} (target ≤ 0.65), "
          f"all/plain = {med['all']/med['plain']:.3f} (target ≤ 0.95)")


def memory_child(folder: str, n: int, words: int) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    from tl_taskmap.activations import capture

    import threading

    model = TransformerBridge.boot_transformers(folder, device="cpu")
    model.eval()
    data = prompts(n, words)
    capture(model, data[:64], ["resid_post", "mlp_post"], "last", batch_size=32, progress=False)  # warm-up
    base = current_rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:  # ru_maxrss keeps the peak of model loading, so sample the live RSS instead
        while not done.is_set():
            peak[0] = max(peak[0], current_rss_mb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    acts = capture(model, data, ["resid_post", "mlp_post"], "last", batch_size=32, progress=False)
    done.set()
    sampler.join()
    result_bytes = sum(t.numel() * t.element_size() for t in acts.values())
    print(json.dumps({"n": n, "words": words, "peak_increase_mb": peak[0] - base, "result_mb": result_bytes / 2**20}))


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory(folder: Path, ns: list[int], word_lengths: list[int]) -> None:
    print("memory: peak RSS increase during capture (fresh process each), vs the size of the reduced result")
    for n in ns:
        for words in word_lengths:
            out = subprocess.run([sys.executable, __file__, "--memory-child", str(folder), str(n), str(words)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  N={r['n']:>6}  words/prompt≤{r['words']:>3}  peak +{r['peak_increase_mb']:7.1f} MB   result {r['result_mb']:7.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CI-sized run (seconds)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--smollm-shape", action="store_true", help="early-stop check on a random model of SmolLM2-135M's shape")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared CPU)")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]), int(args.memory_child[2]))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smollm_shape:
            folder = build_model(Path(tmp) / "smollm", 30, 576, d_mlp=1536, vocab=49152, heads=9, kv_heads=3)
            early_stop_speed(folder, batch=8, words=32, repeats=3 if args.small else 5)
            return
        layers, d_model = (4, 128) if args.small else (args.layers, args.d_model)
        folder = build_model(Path(tmp) / "model", layers, d_model)
        speed(folder, batch=8, words=48, repeats=3 if args.small else 10)
        early_stop_speed(folder, batch=8, words=48, repeats=3 if args.small else 10)
        memory(folder, [500, 2000] if args.small else [5000, 20000], [8, 64] if args.small else [8, 96])


if __name__ == "__main__":
    main()
