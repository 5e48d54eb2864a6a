"""A tiny causal LM and ChatML tokenizer built in code, for fast offline tests.

``build_tiny_tokenizer()`` trains a byte-level BPE (vocab ~768) on a small built-in corpus with
``tokenizers`` and wraps it in a ``PreTrainedTokenizerFast`` with a ChatML chat template that also renders
Hermes/Qwen-style tools and tool calls. ``build_tiny_model(tok)`` is a random-init ``LlamaForCausalLM``
(hidden 64, 2 layers) whose weights depend only on ``seed``. Neither touches the network or the disk.
"""

from __future__ import annotations

import functools

import torch

from gym_plugin.models.toolcalls import CHATML_TOOLS_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
"""Special tokens of the tiny tokenizer; ids 0, 1, 2 in this order."""

TINY_VOCAB_SIZE = 768
"""Target BPE vocabulary size (256 byte symbols + special tokens + merges)."""

# Varied text (chat, math, JSON tool calls, template words) so that common pieces of test prompts get merges
# and token sequences are shorter than bytes.
_CORPUS = [
    "You are a helpful assistant.",
    "What is the capital of France? Reply with only the city name. Paris",
    "What is the capital of Japan? Tokyo. What is the capital of Italy? Rome.",
    "What is 2 + 3? Reply with only the number. 5",
    "What is 12 + 30? The answer is \\boxed{42}.",
    "Compute 7 * 8 = 56, then add 9 to get 65. The final answer is \\boxed{65}.",
    "Let x = 3 and y = 4. Then x^2 + y^2 = 25, so the hypotenuse is 5.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How can I help you today? I am happy to help with math, code and questions.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 + 2"}}\n</tool_call>',
    '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
    "<tool_response>\n4\n</tool_response>",
    "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"calculator\", \"description\": "
    "\"Evaluate an arithmetic expression\", \"parameters\": {\"type\": \"object\", \"properties\": "
    "{\"expression\": {\"type\": \"string\"}}, \"required\": [\"expression\"]}}}\n</tools>",
    "# Tools\n\nYou can call the functions below. Their signatures are given inside <tools></tools>:",
    "To call a function, answer with a JSON object holding its name and arguments inside "
    "<tool_call></tool_call> tags.",
    "system\nuser\nassistant\ntool\n",
    "The weather today is sunny with a light breeze. Tomorrow it will rain in the afternoon.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000",
    "Question: If Tom has 3 apples and buys 5 more, how many apples does he have? Answer: 8",
    "Please think step by step and put your final answer within \\boxed{}.",
]


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    # Cached as JSON (not the object) so every caller gets an independent tokenizer it may mutate.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so that pairs seen once still reach the trainer's min frequency.
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer(tokenizer_json: str | None = None):
    """A byte-level BPE ChatML tokenizer (``PreTrainedTokenizerFast``), built in code, offline, in ~0.1 s.

    eos = ``<|im_end|>`` (the end of an assistant turn), pad = ``<|endoftext|>``, no bos. The chat template
    renders ``tools``, assistant ``tool_calls`` and ``role: tool`` messages (Hermes/Qwen style).
    ``tokenizer_json``: another backend with the same special tokens (gym_plugin.models.random_init pads the
    vocabulary).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer_json or _trained_tokenizer_json())
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
        model_max_length=2048,
        padding_side="left",
    )
    tok.chat_template = CHATML_TOOLS_TEMPLATE
    return tok


def build_tiny_model(tokenizer, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-init ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads, 2 KV heads) sized to ``tokenizer``.

    The weights depend only on ``seed`` (the global RNG is left untouched). ``initializer_range`` is larger
    than Llama's 0.02 so that next-token distributions are peaked rather than near-uniform: greedy choices
    are then far from ties and do not flip under the tiny numeric differences between batched and unbatched
    runs. Returned in eval mode.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()
