"""The tiny test model and tokenizer: offline, deterministic, ChatML with tools."""

from __future__ import annotations

import torch

from gym_plugin.models.tiny import build_tiny_model, build_tiny_tokenizer


def test_special_tokens_and_vocab():
    tok = build_tiny_tokenizer()
    # SPECIAL_TOKENS are trained first, so they get ids 0, 1, 2 in order.
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    assert 512 <= len(tok) <= 1024
    # A special token in text is one token, never split into bytes.
    assert tok.encode("<|im_start|>user", add_special_tokens=False)[0] == 1


def test_byte_level_roundtrip_and_merges():
    tok = build_tiny_tokenizer()
    text = "What is the capital of France? Ünïcödé ✓ \\boxed{42}"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text  # byte-level: any text round-trips
    # "What is the capital of France?" is 30 bytes; it is in the corpus, so merges make it far shorter.
    assert len(tok.encode("What is the capital of France?", add_special_tokens=False)) < 12


def test_tokenizer_is_cached_but_independent():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a is not b and a.get_vocab() == b.get_vocab()
    a.chat_template = "changed"
    assert b.chat_template != "changed"


def test_chat_template_plain():
    tok = build_tiny_tokenizer()
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_tools_tool_calls_and_tool_messages():
    tok = build_tiny_tokenizer()
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]
    msgs = [
        {"role": "user", "content": "2+2?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"e": "2+2"}'}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
    ]
    text = tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n")
    assert '<tools>\n{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}\n</tools>' in text
    assert text.endswith(
        "<|im_start|>user\n2+2?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "calc", "arguments": {"e": "2+2"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_model_is_deterministic_and_sized():
    tok = build_tiny_tokenizer()
    m1, m2, m3 = build_tiny_model(tok), build_tiny_model(tok), build_tiny_model(tok, seed=1)
    assert m1.config.hidden_size == 64 and m1.config.num_hidden_layers == 2
    assert m1.config.vocab_size == len(tok)
    assert not m1.training
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert not torch.equal(m1.model.embed_tokens.weight, m3.model.embed_tokens.weight)
    # The global RNG is untouched: building a model does not change what torch.rand returns next.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tok)
    assert torch.equal(torch.rand(3), expected)


def test_model_dtype_and_forward():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, dtype=torch.bfloat16)
    ids = torch.tensor([tok.encode("hello world", add_special_tokens=False)])  # [1, T]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits  # [1, T, V]
    assert logits.dtype == torch.bfloat16
    assert logits.shape == (1, ids.shape[1], len(tok))
