"""Which chat template renders a model's conversations with tools, and rendering with it.

One rule, shared by the embedded server, the policy model server's token-in/token-out mode and the vLLM
command helper (``gym-plugin vllm-args``), so that all three put the same text in front of the model:

- a tokenizer whose own chat template renders ``tools`` keeps it;
- otherwise (SmolLM2's plain ChatML template ignores ``tools``) conversations are rendered by gym_plugin's
  ChatML+Hermes template (``toolcalls.chatml_tools_template``), given the original template's default system
  text, so a plain chat renders exactly as the model's own template renders it.

``served_chat_template(tokenizer)`` is the template to hand to vLLM (``--chat-template FILE``);
``ChatRenderer`` renders messages (+ tools) to text / token ids the way vLLM renders them with that template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from gym_plugin.errors import ConfigError, ModelLoadError, ProtocolError
from gym_plugin.models.toolcalls import chatml_tools_template, template_renders_tools


def default_system_text(tokenizer) -> str | None:
    """The system text a ChatML template adds by itself when a chat has no system turn (None if it adds none)."""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "zz_probe"}], tokenize=False, add_generation_prompt=False
        )
    except Exception:  # noqa: BLE001 - no usable template: no default
        return None
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text:
        return text[len(head) : text.index("<|im_end|>")]
    return None


def tools_fallback_template(tokenizer) -> str | None:
    """gym_plugin's tools template for ``tokenizer`` (None when the tokenizer's own template renders tools)."""
    if template_renders_tools(tokenizer):
        return None
    default_system = default_system_text(tokenizer)
    return chatml_tools_template(default_system=default_system or "You are a helpful assistant.",
                                 always_system=default_system is not None)


def served_chat_template(tokenizer) -> str:
    """The one template a server (vLLM's ``--chat-template``) should use for every conversation of this model."""
    own = getattr(tokenizer, "chat_template", None)
    if not own:
        raise ModelLoadError(
            "The tokenizer has no chat_template, so chat messages cannot be rendered. Use a chat/instruct model "
            "or set tokenizer.chat_template first."
        )
    return tools_fallback_template(tokenizer) or own


def load_tokenizer(spec: str, key: str = "tokenizer"):
    """The tokenizer of a model spec, as ``model.spec`` takes it: 'smollm2' | 'tiny' | a Hugging Face folder (or a
    hub id), with an error that names the config ``key`` and the fix."""
    if not spec:
        raise ConfigError(f"{key} is not set: give the policy model's Hugging Face folder (or hub id, or "
                          f"'smollm2'), e.g. {key}=~/.cache/gym_plugin/models/smollm2-135m-instruct.")
    try:
        if spec == "tiny":
            from gym_plugin.models.tiny import build_tiny_tokenizer

            return build_tiny_tokenizer()
        if spec.startswith("random:"):
            from gym_plugin.models.random_init import random_tokenizer

            return random_tokenizer(spec)
        if spec == "smollm2":
            from gym_plugin.models import ensure_smollm2

            spec = str(ensure_smollm2())
        from transformers import AutoTokenizer

        path = Path(spec).expanduser()
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else spec)
    except Exception as e:  # noqa: BLE001 - any failure is reported with what was tried
        raise ConfigError(
            f"{key}={spec!r}: cannot load a tokenizer from it ({type(e).__name__}: {e}). Set {key} to the "
            "policy model's Hugging Face folder (the one vLLM serves, with tokenizer.json and its chat template) "
            "or a hub id reachable from here."
        ) from e


class ChatRenderer:
    """Messages (+ tools) -> prompt text / token ids with the template rule of this module.

    Conversations with tools, tool calls or tool messages use the fallback template when the tokenizer's own
    ignores tools; plain ones use the tokenizer's own (identical text by construction, see the module doc).
    Ids are encoded without adding special tokens (the template writes them), as vLLM does.
    """

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError(
                "The tokenizer has no chat_template, so chat messages cannot be rendered. Use a chat/instruct "
                "model or set tokenizer.chat_template before serving it."
            )
        self.tokenizer = tokenizer
        self.fallback_template = tools_fallback_template(tokenizer)

    def render_text(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool = True,
                    chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
        needs_tools = bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
        template = self.fallback_template if needs_tools else None
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt,
                chat_template=template, **dict(chat_template_kwargs or {}),
            )
        except Exception as exc:  # a template error is caused by the messages
            raise ProtocolError(
                f"The chat template could not render the messages: {type(exc).__name__}: {exc}. Check the roles "
                "and contents of the conversation."
            ) from exc

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))
