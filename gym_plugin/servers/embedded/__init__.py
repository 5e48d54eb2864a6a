"""Embedded policy: a local Hugging Face causal LM served with vLLM's OpenAI-compatible API.

``EmbeddedPolicyServer`` (HTTP + weight updates, ``app.py``) around ``GenerationEngine`` (dynamic batching,
KV-cache decoding, raw log-probs, ``engine.py``). ``main`` is the ``gym-plugin embedded`` command.
"""

from gym_plugin.servers.embedded.app import (
    ChatRequest,
    EmbeddedPolicyConfig,
    EmbeddedPolicyServer,
    InvalidRequestError,
    PromptRenderer,
    main,
)
from gym_plugin.servers.embedded.engine import GenerationEngine, GenerationResult, SamplingParams

__all__ = [
    "ChatRequest",
    "EmbeddedPolicyConfig",
    "EmbeddedPolicyServer",
    "GenerationEngine",
    "GenerationResult",
    "InvalidRequestError",
    "PromptRenderer",
    "SamplingParams",
    "main",
]
