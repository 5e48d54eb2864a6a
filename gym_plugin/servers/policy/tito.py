"""Token-in/token-out prompts for multi-turn rollouts: the next call's prompt extends the previous call's tokens.

A chat backend re-renders the whole conversation each turn, and the re-rendered tokens of earlier turns need
not be the ones the model saw and produced (BPE re-splits the text differently, tool-call JSON is
re-formatted): the trainer's multi-turn row then no longer matches what was sampled ("drift"). Here the prompt
of call k+1 is built from token ids instead:

    prompt_{k+1} = prompt_k + generation_k + ids(appended text)

where ``prompt_k`` and ``generation_k`` are the ids the backend reported for call k (they ride on the history's
assistant message, see ``responses.input_to_messages``), and the appended text is exactly what the chat
template puts after the model's turn: the turn's closing scaffolding, the tool outputs / user messages that
followed, and the next generation prompt. It is found by rendering the conversation twice,

    A = render(messages up to and including the last assistant turn, no generation prompt)
    B = render(all messages, with the generation prompt)            (B must start with A)

and taking ``tail(A) + B[len(A):]``, where ``tail(A)`` is what A has after the text of the generation's last
token (its stop token, e.g. ``<|im_end|>``; when the model did not stop on a special token the template's own
turn end is included). Only that appended text is tokenized, once; the model's output is never re-tokenized.

``ContinuationError`` says why a conversation cannot be continued this way (a template that rewrites earlier
turns, e.g. one that drops past reasoning); the caller then renders the whole conversation (the rollout will
show as drift in ``process_rollouts``) and counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gym_plugin.models.chat_template import ChatRenderer
from gym_plugin.errors import ProtocolError
from gym_plugin.protocol import GENERATION_TOKEN_IDS, PROMPT_TOKEN_IDS

_TOKEN_KEYS = (PROMPT_TOKEN_IDS, GENERATION_TOKEN_IDS)


class ContinuationError(ProtocolError):
    """The conversation's next prompt cannot be built by extending the previous call's tokens (says why)."""


@dataclass
class TokenPrompt:
    """The prompt of one model call."""

    ids: list[int]
    """The whole prompt, token ids."""
    continued_from: int | None
    """Index (in the chat messages) of the assistant turn whose ids were extended; None for a fresh render."""
    appended: int
    """How many ids were rendered and tokenized for this call (the whole prompt when fresh)."""


def _plain(messages: list[dict]) -> list[dict]:
    """Messages without the token keys (a template must not see them)."""
    return [{k: v for k, v in m.items() if k not in _TOKEN_KEYS} if _TOKEN_KEYS[0] in m else m for m in messages]


def last_token_turn(messages: list[dict]) -> int | None:
    """Index of the last assistant message that carries the ids of its model call, or None."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.get("role") == "assistant" and m.get(PROMPT_TOKEN_IDS) is not None:
            return i
    return None


def build_prompt(renderer: ChatRenderer, messages: list[dict], tools: list[dict] | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None) -> TokenPrompt:
    """The prompt ids of the next model call for chat ``messages`` (see the module doc).

    Raises ContinuationError when the earlier turn's ids cannot be extended (the caller decides what to do).
    """
    j = last_token_turn(messages)
    plain = _plain(messages)
    if j is None:
        ids = renderer.encode(renderer.render_text(plain, tools, True, chat_template_kwargs))
        return TokenPrompt(ids=ids, continued_from=None, appended=len(ids))
    turn = messages[j]
    prev_prompt, prev_gen = turn[PROMPT_TOKEN_IDS], turn.get(GENERATION_TOKEN_IDS)
    if not isinstance(prev_prompt, list) or not isinstance(prev_gen, list):
        raise ContinuationError(f"assistant message {j} carries {PROMPT_TOKEN_IDS} but {GENERATION_TOKEN_IDS} is "
                                f"{type(prev_gen).__name__}; both must be lists of ints")
    before = renderer.render_text(plain[: j + 1], tools, False, chat_template_kwargs)
    after = renderer.render_text(plain, tools, True, chat_template_kwargs)
    if not after.startswith(before):
        raise ContinuationError(
            f"the chat template renders the conversation up to assistant message {j} differently once later "
            "messages follow (it rewrites earlier turns), so the next prompt cannot extend that turn's tokens"
        )
    tail = _turn_tail(renderer, before, prev_gen)
    appended = renderer.encode(tail + after[len(before):])
    return TokenPrompt(ids=list(prev_prompt) + list(prev_gen) + appended, continued_from=j, appended=len(appended))


def _turn_tail(renderer: ChatRenderer, rendered: str, gen_ids: list[int]) -> str:
    """What the template writes after the model's last generated token, up to the end of ``rendered``.

    The model ends its turn with a special token (eos, ``<|im_end|>``) that the template also writes: the tail
    is what follows its last occurrence (``"\\n"`` for ChatML). A generation that stopped otherwise (length, a
    stop string) did not close its turn: the tail then starts at the template's own turn end (the eos text),
    which is scaffolding, not model output.
    """
    tok = renderer.tokenizer
    special = set(getattr(tok, "all_special_ids", ()) or ())
    last = gen_ids[-1] if gen_ids else None
    if last is not None and last in special:
        marker = tok.decode([last], skip_special_tokens=False)
        at = rendered.rfind(marker) if marker else -1
        if at < 0:
            raise ContinuationError(f"the generation ended with special token {last} ({marker!r}) but the chat "
                                    "template does not write it at the end of an assistant turn")
        return rendered[at + len(marker):]
    eos = getattr(tok, "eos_token", None)
    at = rendered.rfind(eos) if eos else -1
    if at < 0:
        raise ContinuationError(f"the generation did not end with a special token and the chat template's "
                                f"assistant turn has no eos text ({eos!r}) to close it with")
    return rendered[at:]
