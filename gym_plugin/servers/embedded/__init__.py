"""Embedded policy: a local Hugging Face causal LM served with vLLM's OpenAI-compatible API.

``EmbeddedPolicyServer`` (a `gym_plugin.servers.base.Server`: HTTP routes + weight updates, ``app.py``) around
``GenerationEngine`` (dynamic batching, KV-cache decoding, raw log-probs, ``engine.py``), configured by
``EmbeddedPolicyConfig`` (``config.py``). ``gym-plugin embedded`` (gym_plugin.cli) serves it from the command
line, ``policy_endpoint: {impl: embedded}`` from a config.

The names below load lazily: importing the package (or its torch-free ``config``) does not import torch.
"""

from __future__ import annotations

from gym_plugin.lazy import lazy_exports

_EXPORTS = {
    "ChatRequest": "gym_plugin.servers.embedded.app",
    "EmbeddedPolicyServer": "gym_plugin.servers.embedded.app",
    "InvalidRequestError": "gym_plugin.servers.embedded.app",
    "PromptRenderer": "gym_plugin.servers.embedded.app",
    "EmbeddedPolicyConfig": "gym_plugin.servers.embedded.config",
    "GenerationEngine": "gym_plugin.servers.embedded.engine",
    "GenerationResult": "gym_plugin.servers.embedded.engine",
    "SamplingParams": "gym_plugin.servers.embedded.engine",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
