"""Wire shapes of example rows and collector records, parsed and validated once, at the edge.

An example row is a dict with ``responses_create_params`` (OpenAI Responses API create params: ``input`` is a
string or a list of input items) and ``agent_ref`` (``{"name": ...}`` or a bare string). Extra keys travel to
the verifier. The collector yields success records (the agent's reply) and failure records (see
docs/architecture.md); `is_failure` is the one test for the latter.

A record that training reads is parsed here, once, into a typed `Rollout`: its reward, failure, verifier mask,
task / rollout index and one `ModelCall` per model call (the token fields of the call's last output item: the
prompt ids, the generated ids and their log-probs, the policy version, whether the call was constrained). Every
consumer (process_rollouts, the recipe's staleness filter, reward metrics, the NeMo-RL result) reads those, never
the wire field names; the raw record stays on the `Rollout` for writing back.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

from gym_plugin.errors import ProtocolError, truncate

TASK_INDEX_KEY = "_ng_task_index"
ROLLOUT_INDEX_KEY = "_ng_rollout_index"
AGENT_REF_KEY = "agent_ref"
ENVIRONMENT_SERVER_KEY = "_ng_environment_server"
"""Stamped on a record by the collector: the environment server instance the row was posted through."""
RESULT_TYPE_KEY = "_ng_result_type"
"""Stamped with it: that environment server's implementation (e.g. 'legacy_agent'), as NeMo Gym 0.7.0 does."""
PROMPT_TOKEN_IDS = "prompt_token_ids"
GENERATION_TOKEN_IDS = "generation_token_ids"
GENERATION_LOG_PROBS = "generation_log_probs"
TOKEN_FIELDS = (PROMPT_TOKEN_IDS, GENERATION_TOKEN_IDS, GENERATION_LOG_PROBS)
"""The token fields the policy model server writes on the last output item of every model call (all three or
none): the call's whole prompt, the generated ids, one log-prob per generated id (`token_fields` writes them).
Earlier turns' assistant messages carry the first two back to the policy model server (token-in/token-out)."""
_PROMPT, _GENERATION, _LOGPROBS = TOKEN_FIELDS
POLICY_VERSION_KEY = "policy_version"
"""On a token-carrying item: the policy (weights) version the call was sampled with."""
CONSTRAINED_KEY = "constrained"
"""On a token-carrying item: true when the call was sampled under a grammar (its log-probs are not the policy's)."""
MASK_SAMPLE_KEY = "mask_sample"
"""On a record: the verifier judged the rollout but asks the trainer not to learn from it."""

FAILURE_KINDS = (
    "timeout",
    "connection",
    "http_status",
    "malformed_response",
    "verifier",
    "agent",
    "invalid_row",
)


DRIFT = -1
"""`splice_offsets` value of a model call whose prompt does not extend the tokens before it."""


def splice_offsets(calls: Sequence[Sequence[Any]]) -> list[int]:
    """The multi-turn token splice and its prefix check: the one definition behind `process_rollouts` rows and
    NeMo-RL message logs.

    ``calls``: one entry per model call of a rollout, in order, each starting with ``(prompt_token_ids,
    generation_token_ids, ...)`` as lists. A rollout is one token sequence when every call's prompt starts with
    the previous call's prompt + generation (tool output and template scaffolding come after):

        sequence = prompt_0 + gen_0 + prompt_1[offset_1:] + gen_1 + prompt_2[offset_2:] + gen_2 ...

    Returns ``offset_k`` for each call: 0 for the first; ``len(prompt_{k-1}) + len(gen_{k-1})`` when call k
    extends call k-1 (so ``prompt_k[offset_k:]`` is the context added since: tool results, scaffolding);
    `DRIFT` (-1) when it does not (the chat template rewrote the history, e.g. dropped reasoning), where a new
    sequence has to start. Two C-speed list-slice comparisons per call; nothing is concatenated.
    """
    offsets = [0] * len(calls)
    if len(calls) < 2:
        return offsets
    prev_prompt, prev_gen = calls[0][0], calls[0][1]
    for k in range(1, len(calls)):
        prompt, gen = calls[k][0], calls[k][1]
        n_p, n_g = len(prev_prompt), len(prev_gen)
        if len(prompt) >= n_p + n_g and prompt[:n_p] == prev_prompt and prompt[n_p : n_p + n_g] == prev_gen:
            offsets[k] = n_p + n_g
        else:
            offsets[k] = DRIFT
        prev_prompt, prev_gen = prompt, gen
    return offsets


def first_difference(prompt: Sequence[int], prev_prompt: Sequence[int], prev_gen: Sequence[int]) -> int:
    """Where ``prompt`` stops matching ``prev_prompt + prev_gen`` (for error messages about a `DRIFT`)."""
    seen = list(prev_prompt) + list(prev_gen)
    for i, (a, b) in enumerate(zip(prompt, seen)):
        if a != b:
            return i
    return min(len(prompt), len(seen))


def agent_name(row: Mapping[str, Any], where: str = "example row") -> str:
    """The agent a row is routed to: ``agent_ref`` as ``{"name": ...}`` or a string."""
    ref = row.get("agent_ref")
    if isinstance(ref, Mapping):
        ref = ref.get("name")
    if not isinstance(ref, str) or not ref:
        raise ProtocolError(
            f"{where} has no usable 'agent_ref' (got {truncate(row.get('agent_ref'), 100)}); "
            'add "agent_ref": {"name": "<agent instance name from your config>"} to the row'
        )
    return ref


def validate_row(row: Any, where: str = "example row") -> Mapping[str, Any]:
    """The checks every receiver of a row applies (the collector before posting, an agent's /run on receipt): a JSON
    object whose ``responses_create_params.input`` is a non-empty string or list. Returns the create params; raises
    ProtocolError naming ``where``."""
    if not isinstance(row, Mapping):
        raise ProtocolError(f"{where} is a {type(row).__name__}, expected a JSON object: {truncate(row, 200)}")
    params = row.get("responses_create_params")
    if not isinstance(params, Mapping):
        raise ProtocolError(
            f"{where} has no 'responses_create_params' object (got {truncate(params, 100)}); "
            'expected e.g. {"responses_create_params": {"input": [{"role": "user", "content": "..."}]}}'
        )
    inp = params.get("input")
    if not isinstance(inp, (str, list)) or not inp:
        raise ProtocolError(
            f"{where}: responses_create_params.input must be a non-empty string or list of items, "
            f"got {truncate(inp, 100)}"
        )
    return params


def validate_example(row: Any, index: int | None = None) -> dict:
    """Check a row has the shape the agents need (`validate_row`) and names its agent; returns it (as a dict).
    Raises ProtocolError naming the row."""
    where = f"example row {index}" if index is not None else "example row"
    validate_row(row, where)
    agent_name(row, where)
    return dict(row)


def is_failure(record: Mapping[str, Any]) -> bool:
    """True for a collector failure record (the row did not produce a usable rollout)."""
    return record.get("failure") is not None


def failure_record(
    row: Mapping[str, Any] | Any,
    *,
    kind: str,
    reason: str,
    attempts: int = 0,
    last_error: str = "",
    url: str | None = None,
    task_index: int | None = None,
    rollout_index: int = 0,
) -> dict:
    """A failure record: the input row's keys, ``reward: None`` and a ``failure`` object that says why."""
    assert kind in FAILURE_KINDS, kind
    base = dict(row) if isinstance(row, Mapping) else {"invalid_row": truncate(row, 500)}
    base.update(
        {
            TASK_INDEX_KEY: task_index,
            ROLLOUT_INDEX_KEY: rollout_index,
            "reward": None,
            "failure": {
                "kind": kind,
                "reason": reason,
                "attempts": attempts,
                "last_error": last_error,
                "url": url,
            },
        }
    )
    return base


def describe_failure(record: Mapping[str, Any], limit: int = 300) -> str:
    """One line for a failure record: 'row 3 (repeat 0) failed: http_status after 3 attempts: <reason>; last error:
    <the last attempt's error>' (each cut to ``limit`` characters)."""
    failure = record.get("failure") or {}
    attempts = failure.get("attempts")
    tries = f" after {attempts} attempt{'s' if attempts != 1 else ''}" if attempts else ""
    reason, last = str(failure.get("reason") or ""), str(failure.get("last_error") or "")
    detail = f"; last error: {truncate(last, limit)}" if last and last not in reason else ""
    return (f"row {record.get(TASK_INDEX_KEY)} (repeat {record.get(ROLLOUT_INDEX_KEY, 0)}) failed: "
            f"{failure.get('kind', '?')}{tries}: {truncate(reason, limit)}{detail}")


def token_fields(prompt: Sequence[int], generation: Sequence[int], logprobs: Sequence[float],
                 policy_version: Any = None, constrained: bool = False) -> dict[str, Any]:
    """The fields a policy model server puts on the last output item of a model call (the writer's side of
    `parse_rollout`): the three token fields, plus the policy version when known and ``constrained: true`` for
    a call sampled under a grammar."""
    fields: dict[str, Any] = {_PROMPT: list(prompt), _GENERATION: list(generation),
                              _LOGPROBS: [float(x) for x in logprobs]}
    if policy_version is not None:
        fields[POLICY_VERSION_KEY] = policy_version
    if constrained:
        fields[CONSTRAINED_KEY] = True
    return fields


def is_reward(value: Any) -> bool:
    """A usable reward: an int or a float (not a bool, not None)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---- the typed rollout -------------------------------------------------------------------------------------------
class ModelCall(NamedTuple):
    """One model call of a rollout, read from the last output item of the call. A tuple, so
    ``prompt, generation, logprobs = call[:3]`` and `splice_offsets` take it as they take plain tuples."""

    prompt: Sequence[int]
    """The call's whole prompt as token ids (what the policy was conditioned on)."""
    generation: Sequence[int]
    """The generated token ids."""
    logprobs: Sequence[float]
    """The sampler's log-prob of each generated token (same length as ``generation``)."""
    policy_version: Any = None
    """The policy version the call was sampled with (None when the backend reported none)."""
    constrained: bool = False
    """Sampled under a grammar (tool_choice required, a response format): log-probs of the constrained
    distribution, not the policy's."""
    item: Mapping[str, Any] | None = None
    """The output item that carried the tokens (for the item's other fields; None for calls built in code)."""


class TokenProblem(NamedTuple):
    """An output item whose token fields cannot be read as a model call."""

    item_index: int
    """Its position in ``response.output``."""
    has_generation: bool
    """Whether it carries a non-empty generation (an item with nothing generated trains nothing either way)."""
    message: str
    """What is wrong, naming the item and its fields."""


class Rollout(NamedTuple):
    """A collector record parsed once (`parse_rollout`): what training reads of it, with the record kept.

    ``tokens`` says whether the model calls can be trained on as they are: 'ok' (``calls`` holds every model call,
    in order), 'missing' (no response output, or no item carries token ids: the endpoint returns none) or
    'malformed' (an item carries some token fields but not a usable triple; ``problems`` says which).
    A tuple (cheap to build: process_rollouts parses every record of a batch)."""

    record: Mapping[str, Any]
    """The record as the collector yielded it (written back to rollout files unchanged)."""
    reward: float | None
    """The verifier's reward; None for a failure record."""
    failure: Mapping[str, Any] | None
    """The failure object of a failure record (kind, reason, attempts, last_error, url), else None."""
    masked: bool
    """The verifier flagged ``mask_sample``: judged, but not to be trained on."""
    incomplete: bool
    """The response has ``incomplete_details`` (the sampler stopped on a length limit)."""
    calls: list[ModelCall]
    """The model calls, in order (items without token fields are skipped)."""
    tokens: str
    """'ok' | 'missing' | 'malformed' (see the class docstring)."""
    problems: list[TokenProblem]
    """The items whose token fields are unusable (empty unless ``tokens == 'malformed'``)."""
    policy_version: Any
    """The oldest policy version over the rollout's model calls (None when none reports one)."""
    output_is_list: bool
    """``response.output`` is a list (False: no response, or not the Responses shape)."""
    generated_tokens: int
    """Tokens the policy generated, over every item that carries a generation (usable or not)."""

    @property
    def failed(self) -> bool:
        """No usable rollout: a failure record, or a record without a reward."""
        return self.failure is not None or self.reward is None

    @property
    def task_index(self) -> Any:
        """``_ng_task_index``: the input row the rollout came from (its group)."""
        return self.record.get(TASK_INDEX_KEY)

    @property
    def rollout_index(self) -> Any:
        """``_ng_rollout_index``: the repeat of that row (0 with one rollout per row)."""
        return self.record.get(ROLLOUT_INDEX_KEY, 0)

    def output_types(self) -> list[Any]:
        """The ``type`` of every output item (for messages about a rollout without usable tokens)."""
        response = self.record.get("response")
        output = response.get("output") if isinstance(response, Mapping) else None
        return [it.get("type") for it in output or () if isinstance(it, Mapping)] if self.output_is_list else []

    def __repr__(self) -> str:
        return (f"Rollout(task={self.task_index!r}, repeat={self.rollout_index!r}, reward={self.reward!r}, "
                f"failed={self.failed}, masked={self.masked}, calls={len(self.calls)}, tokens={self.tokens!r})")


def _where(record: Mapping[str, Any], index: int | None) -> str:
    return f"rollouts[{index}]" if index is not None else f"rollout (row {record.get(TASK_INDEX_KEY)!r})"


def _token_list(value: Any) -> bool:
    return type(value) is list or isinstance(value, (list, tuple))


def parse_rollout(record: Any, index: int | None = None) -> Rollout:
    """The one parse of a collector record (or anything with ``.to_dict()`` giving one) into a `Rollout`.

    ``index``: the record's position in its batch, for error messages. Raises ProtocolError for a record that is
    not a mapping or whose reward is neither a number nor null. Unusable token fields do not raise: they make
    ``tokens`` 'missing' / 'malformed' (process_rollouts counts such rollouts, the NeMo-RL drop-in refuses them).
    An already parsed `Rollout` is returned as it is.
    """
    if type(record) is not dict:  # exact-type test first: the ABC check below is slow on a hot path
        if isinstance(record, Rollout):
            return record
        if not isinstance(record, Mapping):
            to_dict = getattr(record, "to_dict", None)
            if not callable(to_dict):
                raise ProtocolError(
                    f"{_where({}, index)} is a {type(record).__name__}, not a record in the Gym wire format. Pass the "
                    "records the collector yields (dicts with 'response' and 'reward'), or objects with a .to_dict().")
            record = to_dict()
    get = record.get
    failure = get("failure")
    reward = get("reward")
    if reward is not None:
        try:
            reward = float(reward)
        except (TypeError, ValueError):
            raise ProtocolError(f"{_where(record, index)} has reward {truncate(reward, 60)}, not a number; the "
                                "verifier must answer a numeric 'reward'.") from None
    response = get("response")
    is_mapping = type(response) is dict or isinstance(response, Mapping)
    output = response.get("output") if is_mapping else None
    incomplete = bool(response.get("incomplete_details")) if is_mapping else False
    calls: list[ModelCall] = []
    problems: list[TokenProblem] = []
    version: Any = None
    generated = 0
    if output:
        new_call = tuple.__new__  # ModelCall(...) without its Python-level __new__: this loop runs per model call
        for i, item in enumerate(output):
            if type(item) is not dict and not isinstance(item, Mapping):
                problems.append(TokenProblem(i, False, f"output item {i} is a {type(item).__name__}, not an object"))
                continue
            item_get = item.get
            gen = item_get(_GENERATION)
            if gen is None and item_get(_PROMPT) is None and item_get(_LOGPROBS) is None:
                continue  # tool outputs, reasoning, earlier items of the same model call carry no tokens
            prompt = item_get(_PROMPT)
            lps = item_get(_LOGPROBS)
            if ((type(gen) is list or _token_list(gen)) and (type(prompt) is list or _token_list(prompt))
                    and (type(lps) is list or _token_list(lps)) and len(gen) == len(lps)):
                generated += len(gen)
                v = item_get(POLICY_VERSION_KEY)
                if v is not None and (version is None or v < version):
                    version = v
                calls.append(new_call(ModelCall, (prompt, gen, lps, v, bool(item_get(CONSTRAINED_KEY)), item)))
                continue
            if _token_list(gen):
                generated += len(gen)
            problems.append(TokenProblem(
                i, bool(gen),
                f"output item {item_get('id', i)!r} has {_GENERATION} {truncate(gen, 60)} but {_PROMPT} "
                f"{truncate(prompt, 60)} / {_LOGPROBS} of length "
                f"{len(lps) if _token_list(lps) else repr(lps)} (want {len(gen) if _token_list(gen) else gen}): "
                "the policy model server writes all three, with one log-prob per generated token"))
    tokens = "malformed" if problems else ("ok" if calls else "missing")
    return tuple.__new__(Rollout, (record, reward, failure, bool(get(MASK_SAMPLE_KEY)), incomplete, calls, tokens,
                                   problems, version, type(output) is list or isinstance(output, list), generated))


def parse_rollouts(records: Sequence[Any]) -> list[Rollout]:
    """`parse_rollout` over a batch (each record's position named in errors)."""
    return [parse_rollout(r, i) for i, r in enumerate(records)]


def strip_token_fields(call: ModelCall) -> None:
    """Remove the three token fields from the item that carried ``call`` (in place), once they were read."""
    if call.item is not None:
        for key in TOKEN_FIELDS:
            call.item.pop(key, None)  # type: ignore[attr-defined]
