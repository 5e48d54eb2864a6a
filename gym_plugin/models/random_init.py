"""Random-init models of real architectures and sizes, built in code (``model.spec=random:<name>``).

For measuring where no checkpoint can be fetched (the lent GPU machine has no network): the architecture,
parameter count and vocabulary of a real model, with random weights, and the tiny test tokenizer
(``gym_plugin.models.tiny``) padded to the model's vocabulary, so that every id the model samples decodes to
something (`padded_tokenizer`). What such a model says is noise; what it costs to sample and train is the real
model's.

Named configs (``RANDOM_CONFIGS``): ``smollm2-135m`` (SmolLM2-135M's Llama config, 134.5M parameters, tied
embeddings), ``qwen2.5-0.5b`` (Qwen2.5-0.5B's Qwen2 config, 494.0M parameters, tied embeddings), and two tiny
ones of the same architectures for CPU dry runs (``llama-tiny``, ``qwen2-tiny``).
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

from gym_plugin.errors import ModelLoadError, did_you_mean

if TYPE_CHECKING:
    import torch

RANDOM_PREFIX = "random:"
"""``model.spec`` prefix of a random-init model: ``random:smollm2-135m``."""

RANDOM_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct's config.json (architecture fields)
    "smollm2-135m": ("llama", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True)),
    # Qwen/Qwen2.5-0.5B-Instruct's config.json (architecture fields)
    "qwen2.5-0.5b": ("qwen2", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, use_sliding_window=False)),
    # the same architectures at CPU-test sizes (a vocabulary larger than the test tokenizer's, as above)
    "llama-tiny": ("llama", dict(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)),
    "qwen2-tiny": ("qwen2", dict(
        vocab_size=1536, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, use_sliding_window=False)),
}
"""name -> (architecture, config fields)."""


def random_config_name(spec: str) -> str:
    """``random:<name>`` -> ``<name>``; ModelLoadError naming the known configs otherwise."""
    name = spec[len(RANDOM_PREFIX):] if spec.startswith(RANDOM_PREFIX) else spec
    if name not in RANDOM_CONFIGS:
        raise ModelLoadError(f"model {spec!r}: {name!r} is not a random-init config."
                             f"{did_you_mean(name, RANDOM_CONFIGS)} Known: {[RANDOM_PREFIX + n for n in RANDOM_CONFIGS]}.")
    return name


def random_model_config(name: str, tokenizer=None):
    """The transformers config of ``RANDOM_CONFIGS[name]`` (with the tokenizer's eos/pad ids when given)."""
    from transformers import LlamaConfig, Qwen2Config

    arch, fields = RANDOM_CONFIGS[random_config_name(name)]
    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return (LlamaConfig if arch == "llama" else Qwen2Config)(**fields, **ids)


@functools.lru_cache(maxsize=4)
def _padded_tokenizer_json(vocab_size: int) -> str:
    from gym_plugin.models.tiny import _trained_tokenizer_json

    data = json.loads(_trained_tokenizer_json())
    vocab: dict[str, int] = data["model"]["vocab"]
    have = max(vocab.values()) + 1
    if vocab_size < have:
        raise ModelLoadError(f"a random-init vocabulary of {vocab_size} is smaller than the test tokenizer's {have}")
    # 'Ġ' is the byte-level symbol of a space: id i decodes to " x<i>". No merge produces these tokens, so text
    # encodes exactly as with the tiny tokenizer; only sampled ids decode to them.
    vocab.update({f"\u0120x{i}": i for i in range(have, vocab_size)})
    return json.dumps(data)


def padded_tokenizer(vocab_size: int):
    """The tiny test tokenizer (ChatML, byte-level BPE) with ``vocab_size`` ids: the ids past its own decode to
    `` x<id>`` (never produced by encoding)."""
    from gym_plugin.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(_padded_tokenizer_json(vocab_size))


def random_tokenizer(spec: str):
    """The tokenizer of ``random:<name>``: the tiny tokenizer padded to that config's vocabulary."""
    return padded_tokenizer(RANDOM_CONFIGS[random_config_name(spec)][1]["vocab_size"])


def build_random_model(spec: str, dtype: torch.dtype | None = None, seed: int = 0):
    """``(model, tokenizer)`` for ``random:<name>``: random weights (depending only on ``seed``; the global RNG is
    left untouched) in ``dtype``, eval mode, and `random_tokenizer`."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = random_tokenizer(spec)
    config = random_model_config(spec, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok
