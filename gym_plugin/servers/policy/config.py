"""The policy model server's config: the YAML keys under ``responses_api_models: vllm_model:``."""

from __future__ import annotations

from dataclasses import dataclass, field

from gym_plugin.errors import did_you_mean
from gym_plugin.net import url_list, url_problems
from gym_plugin.schema import Checked
from gym_plugin.servers.policy.tokens import TOOL_CALL_PARSERS

ROUTINGS = ("round_robin", "least_busy")
TOKEN_STYLES = ("A", "B", "none")
TOKEN_MODES = ("auto", "completions", "chat")


@dataclass
class PolicyModelConfig(Checked):
    """YAML keys under ``responses_api_models: vllm_model:``."""

    base_url: str | list[str] = ""
    """OpenAI-compatible base URL(s) ending in /v1, e.g. 'http://127.0.0.1:8000/v1' (usually ${policy_base_url})."""
    model: str = ""
    """Model name sent to the backend (usually ${policy_model_name})."""
    api_key: str = "dummy_key"
    """Sent as 'Authorization: Bearer <api_key>' (usually ${policy_api_key})."""
    routing: str = "round_robin"
    """How a rollout's backend is chosen among base_urls: 'round_robin' or 'least_busy'."""
    token_style: str = "B"
    """How token ids are asked for: 'B' (return_token_ids, vLLM >= 0.10.2), 'A' (return_tokens_as_token_ids +
    /tokenize for prompt ids), 'none' (no token ids: evaluation against a backend that has none)."""
    timeout_s: float = 600.0
    """Timeout of one backend request, seconds."""
    max_attempts: int = 3
    """Attempts per backend request (connection errors, timeouts, 429, 5xx are retried)."""
    backoff_s: float = 0.2
    """Delay before the 2nd attempt (doubles each attempt, with jitter)."""
    connector_limit: int = 65536
    """aiohttp connection limit of this server's client (usually ${global_aiohttp_connector_limit})."""
    connector_limit_per_host: int = 16384
    """aiohttp per-host connection limit (usually ${global_aiohttp_connector_limit_per_host})."""
    extra_body: dict = field(default_factory=dict)
    """Extra keys merged into every chat completion request (e.g. chat_template_kwargs, top_k)."""
    max_sticky_rollouts: int = 100_000
    """How many rollout -> backend assignments are remembered (oldest forgotten first)."""
    token_mode: str = "auto"
    """'completions' (token-in/token-out through /completions: multi-turn prompts extend the earlier turns'
    token ids; needs the tokenizer), 'chat' (/chat/completions, the backend re-renders history: multi-turn
    rollouts may drift), 'auto' (completions when the backend's GET /models says owned_by 'vllm', else chat)."""
    tokenizer: str | None = None
    """completions mode: the policy model's Hugging Face folder or hub id (tokenizer + chat template). None =
    the 'root' the backend reports in GET /models (vLLM: its --model), when that can be loaded here."""
    tool_call_parser: str = "hermes"
    """The backend's tool call format (vLLM's ``--tool-call-parser``). Token-in mode parses it from the generated
    text and, for ``tool_choice`` required / named, sends the constraint vLLM's chat route builds for it: covered
    for 'hermes' only; another parser needs token_mode 'chat'."""
    report_policy_version: bool = True
    """Ask GET {root}/weight_info (vLLM dev mode) around each call for the policy version when the completion
    carries none; a backend without the route is asked once."""

    def check(self) -> list[str]:
        problems = url_problems(self.base_url, "base_url")
        if self.routing not in ROUTINGS:
            problems.append(f"routing={self.routing!r}: expected one of {ROUTINGS}.{did_you_mean(self.routing, ROUTINGS)}")
        if self.token_style not in TOKEN_STYLES:
            problems.append(
                f"token_style={self.token_style!r}: expected one of {TOKEN_STYLES}."
                f"{did_you_mean(str(self.token_style), TOKEN_STYLES)}"
            )
        if self.max_attempts < 1:
            problems.append(f"max_attempts={self.max_attempts}: must be >= 1")
        if self.token_mode not in TOKEN_MODES:
            problems.append(f"token_mode={self.token_mode!r}: expected one of {TOKEN_MODES}."
                            f"{did_you_mean(str(self.token_mode), TOKEN_MODES)}")
        if self.tool_call_parser not in TOOL_CALL_PARSERS and self.token_mode != "chat":
            problems.append(
                f"tool_call_parser={self.tool_call_parser!r}: token-in mode (token_mode={self.token_mode!r}) reads and "
                f"forces tool calls in the formats of {list(TOOL_CALL_PARSERS)} only (vLLM --tool-call-parser "
                "hermes); set token_mode: chat for that parser (vLLM then parses and constrains the calls itself)")
        if self.token_mode == "completions" and self.token_style == "none":
            problems.append("token_mode='completions' always returns token ids; token_style='none' (no ids) "
                            "needs token_mode='chat'")
        return problems

    @property
    def base_urls(self) -> list[str]:
        return url_list(self.base_url)
