"""Tiny models built locally for the tests (random weights, a small BPE tokenizer; no hub)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "0 1 2 3 4 5 6 7 8 9 + = ? : .",
    "positive negative sentiment review movie great bad good awful",
    "Question: Answer: yes no true false maybe",
] * 20

ROOT = Path(tempfile.mkdtemp(prefix="tl_taskmap_tiny_"))
atexit.register(shutil.rmtree, ROOT, ignore_errors=True)  # every test process made one and left it in /tmp


@functools.lru_cache(maxsize=None)
def tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


@functools.lru_cache(maxsize=None)
def hf_folder(arch: str) -> Path:
    """Save a tiny random HF model ('gpt2' or 'llama') with the tokenizer; return its folder."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=3, n_head=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        )
    elif arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            )
        )
    else:
        raise ValueError(arch)
    folder = ROOT / arch
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def bridge(arch: str) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(str(hf_folder(arch)), device="cpu")
    model.eval()
    return model


def has_hooked_transformer() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def hooked(arch: str) -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    common = dict(n_layers=3, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=len(tokenizer()), seed=0, device="cpu")
    if arch == "gpt2":
        cfg = HookedTransformerConfig(d_mlp=128, act_fn="gelu_new", normalization_type="LN", **common)
    else:
        cfg = HookedTransformerConfig(
            d_mlp=48, act_fn="silu", normalization_type="RMS", gated_mlp=True, positional_embedding_type="rotary",
            rotary_dim=8, **common,
        )
    from transformers import AutoTokenizer

    # HookedTransformer re-loads the tokenizer by its name_or_path, so give it one saved on disk.
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(str(hf_folder(arch))))
    # Random init leaves some biases at zero; make them nonzero so tests see every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("b_in", "b_out", "b_Q", "b_K", "b_V", "b_O")):
                p.normal_(0, 0.1)
    model.eval()
    return model


MODEL_KINDS = ["bridge-gpt2", "bridge-llama", "hooked-gpt2", "hooked-llama"]


def make(kind: str) -> Any:
    backend, arch = kind.split("-")
    return bridge(arch) if backend == "bridge" else hooked(arch)
