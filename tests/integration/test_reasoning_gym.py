"""The reasoning_gym resource server with real reasoning-gym 0.1.25, over real HTTP on 127.0.0.1.

For given replies, the reward must equal the dataset's own ``score_answer`` of the extracted answer; the expected
values are also worked out by hand from reasoning-gym's scorers (each case says how). The rows are generated with
fixed seeds, and the test asserts the question it reasons about, so a changed generator fails loudly.
"""

from __future__ import annotations

import asyncio
import json

import pytest

rg = pytest.importorskip("reasoning_gym", reason="reasoning-gym is not installed: pip install -e '.[reasoning]'")

from gym_plugin.errors import ConfigError  # noqa: E402
from gym_plugin.http import HTTPStatusError, Transport  # noqa: E402
from gym_plugin.reasoning_tasks import EVAL_SEED_OFFSET, generate_rows  # noqa: E402
from gym_plugin.servers.base import Directory  # noqa: E402
from gym_plugin.servers.registry import get_server_class  # noqa: E402
from gym_plugin.servers.resources.reasoning_gym import ReasoningGymConfig, ReasoningGymResourceServer  # noqa: E402

CHAIN = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}
LEGS = {"min_animals": 1, "max_animals": 2, "max_instances": 3}
SPELL = {"min_word_len": 4, "max_word_len": 5}
ARITH = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "allow_parentheses": False,
         "allow_negation": False, "operators": ["+", "*"]}


def reply(text: str) -> dict:
    """A Responses object whose last assistant message is ``text``."""
    return {"id": "resp_1", "output": [{"type": "message", "role": "assistant", "id": "msg_1",
                                        "content": [{"type": "output_text", "text": text}]}]}


async def verify_all(config: ReasoningGymConfig, cases: list[tuple[dict, str]]) -> list[dict]:
    """POST row + reply to /verify of a server on 127.0.0.1, over HTTP (no in-process shortcut)."""
    server = ReasoningGymResourceServer("reasoning", config, Directory())
    await server.start()
    transport = Transport(allow_local=False)
    try:
        return [(await transport.post(f"{server.url}/verify", {**row, "response": reply(text)})).data
                for row, text in cases]
    finally:
        await transport.close()
        await server.stop()


def own_score(row: dict, answer: str | None) -> float:
    """The dataset's own score_answer (a fresh instance with the same keywords) of ``answer``."""
    info = row["reasoning_gym"]
    return rg.create_dataset(info["dataset"], **CONFIGS[info["dataset"]]).score_answer(answer, info["entry"])


CONFIGS = {"chain_sum": CHAIN, "leg_counting": LEGS, "spell_backward": SPELL, "basic_arithmetic": ARITH}


def test_rewards_equal_the_datasets_score_answer_over_http():
    chain = generate_rows("chain_sum", dataset_config=CHAIN, size=1, seed=7)[0]
    legs = generate_rows("leg_counting", dataset_config=LEGS, size=1, seed=7)[0]
    spell = generate_rows("spell_backward", dataset_config=SPELL, size=2, seed=7)[1]
    assert chain["reasoning_gym"]["entry"]["question"].endswith("6 + 0 - 1 =") and chain["expected_answer"] == "5"
    assert legs["reasoning_gym"]["entry"]["question"].endswith("if you have 3 dogs, 1 wasp?\n")
    assert legs["expected_answer"] == "18"  # 3 dogs x 4 + 1 wasp x 6
    assert spell["reasoning_gym"]["entry"]["question"].endswith(": rist") and spell["expected_answer"] == "tsir"
    # the prompt carries the answer-format instruction after the question
    assert chain["responses_create_params"]["input"][0]["content"].endswith(
        "6 + 0 - 1 =\n\nThink step by step. Then write the final answer inside answer tags, like <answer>42</answer>.")
    cases = [
        # chain_sum scores with compute_decimal_reward: equal as decimals -> 1, else len(gold)/len(answer) when the
        # gold is a substring of the answer, else 0
        (chain, "6 + 0 = 6, then 6 - 1 = 5. <answer>5</answer>", 1.0, "5"),
        (chain, "<answer>5.00</answer>", 1.0, "5.00"),  # Decimal("5.00") == Decimal("5")
        (chain, "<answer>x = 5</answer>", 1 / 5, "x = 5"),  # "5" in "x = 5": 1/5 (partial credit)
        (chain, "<answer>6</answer>", 0.0, "6"),
        (chain, "first <answer>4</answer>, no: <answer>5</answer>", 1.0, "5"),  # the last answer counts
        # leg_counting uses the base scorer: exact -> 1, gold inside the answer -> len(gold)/len(answer)
        (legs, "Dogs have 4 legs: 12. A wasp has 6. 12 + 6 = 18. <answer>18</answer>", 1.0, "18"),
        (legs, "<answer>18 legs</answer>", 2 / 7, "18 legs"),
        (legs, "<answer>16</answer>", 0.0, "16"),
        # spell_backward: case-insensitive; else 1/len(gold) per position that matches; a full prefix match of a
        # longer answer is 1 - 0.2
        (spell, "<answer>TSIR</answer>", 1.0, "TSIR"),
        (spell, "<answer>tsia</answer>", 3 / 4, "tsia"),
        (spell, "<answer>tsirr</answer>", 0.8, "tsirr"),
    ]
    results = asyncio.run(verify_all(ReasoningGymConfig(), [(row, text) for row, text, _, _ in cases]))
    for (row, text, expected, extracted), out in zip(cases, results):
        assert out["extracted_answer"] == extracted, text
        assert out["reward"] == pytest.approx(expected), text
        assert out["reward"] == pytest.approx(own_score(row, extracted)), text
        assert out["score_reason"] is None
        assert out["task_id"] == row["task_id"]  # the row comes back with the verifier's keys added


def test_malformed_answers_score_zero_with_the_reason():
    chain = generate_rows("chain_sum", dataset_config=CHAIN, size=1, seed=7)[0]
    boxed = generate_rows("basic_arithmetic", dataset_config=ARITH, size=2, seed=7, answer_format="boxed")[1]
    assert boxed["reasoning_gym"]["entry"]["question"] == "Calculate 48 + 16." and boxed["expected_answer"] == "64"
    assert boxed["responses_create_params"]["input"][0]["content"].endswith("write the final answer as \\boxed{answer}.")
    cases = [
        (chain, "The answer is 5.", "no <answer>...</answer> in the reply"),
        (chain, "<answer>5", "an <answer> tag is never closed"),
        (chain, "<answer> </answer>", "the answer markup is empty"),
        (chain, "", "no <answer>...</answer> in the reply"),
        (boxed, "<answer>64</answer>", "no \\boxed{...} in the reply"),  # the row asked for \boxed{}
    ]
    results = asyncio.run(verify_all(ReasoningGymConfig(), [(row, text) for row, text, _ in cases]))
    for (row, text, reason), out in zip(cases, results):
        assert out["reward"] == 0.0 and out["extracted_answer"] is None, text
        assert reason in out["score_reason"], (text, out["score_reason"])
    # and the boxed row with a boxed answer: 48 + 16 = 64
    (out,) = asyncio.run(verify_all(ReasoningGymConfig(), [(boxed, "48 + 16 = 64, so \\boxed{64}")]))
    assert out["reward"] == 1.0 and out["extracted_answer"] == "64"


def test_a_scorer_that_raises_scores_zero_with_its_exception():
    class Raising:
        def score_answer(self, answer, entry):
            raise KeyError("metadata")

    from gym_plugin.reasoning_tasks import score_reply

    out = score_reply(Raising(), {"question": "q", "answer": "a", "metadata": {}}, "<answer>a</answer>", "answer_tag")
    assert out == {"reward": 0.0, "extracted_answer": "a", "score_reason": "score_answer raised KeyError: 'metadata'"}


def test_mix_rows_are_scored_by_their_own_dataset():
    mix = [{"name": "chain_sum", "weight": 1, "config": CHAIN}, {"name": "leg_counting", "weight": 3, "config": LEGS}]
    rows = generate_rows(mix, size=24, seed=3)
    names = [r["reasoning_gym"]["dataset"] for r in rows]
    assert set(names) == {"chain_sum", "leg_counting"}
    # reasoning-gym's composite draws the dataset of item i with Random(seed + i).choices(weights): recompute it
    import random

    assert names == [["chain_sum", "leg_counting"][random.Random(3 + i).choices(range(2), weights=[1, 3])[0]]
                     for i in range(24)]
    results = asyncio.run(verify_all(ReasoningGymConfig(dataset=mix),
                                     [(r, f"<answer>{r['expected_answer']}</answer>") for r in rows]
                                     + [(r, "<answer>-1</answer>") for r in rows]))
    assert [o["reward"] for o in results] == [1.0] * 24 + [0.0] * 24


def test_train_and_eval_rows_never_share_a_question():
    # leg_counting with 1 animal of 1..3 instances has a small question space: a plain seed offset alone would
    # repeat train questions in eval; the eval split drops them (and says so when it cannot fill itself)
    small = {"min_animals": 1, "max_animals": 1, "max_instances": 3}
    train = generate_rows("leg_counting", dataset_config=small, size=40, seed=0)
    evals = generate_rows("leg_counting", dataset_config=small, size=8, seed=0, split="eval", train_size=40)
    train_q = {r["reasoning_gym"]["entry"]["question"] for r in train}
    assert len(evals) == 8 and not train_q & {r["reasoning_gym"]["entry"]["question"] for r in evals}
    assert {r["task_id"] for r in evals} == {f"reasoning_gym/eval/{i}" for i in range(8)}
    # the eval split's generator seed: reasoning-gym's item 0 of the dataset seeded seed + EVAL_SEED_OFFSET
    big_train = generate_rows("chain_sum", dataset_config=CHAIN, size=50, seed=5)
    big_eval = generate_rows("chain_sum", dataset_config=CHAIN, size=5, seed=5, split="eval", train_size=50)
    first = rg.create_dataset("chain_sum", seed=5 + EVAL_SEED_OFFSET, size=1, **CHAIN)[0]
    assert big_eval[0]["reasoning_gym"]["entry"]["question"] == first["question"]
    assert big_train[0]["reasoning_gym"]["entry"]["question"] == rg.create_dataset(
        "chain_sum", seed=5, size=1, **CHAIN)[0]["question"]
    # deterministic: the same arguments give the same rows
    assert json.dumps(generate_rows("chain_sum", dataset_config=CHAIN, size=50, seed=5)) == json.dumps(big_train)
    with pytest.raises(ConfigError, match="only .* are not train questions"):
        generate_rows("leg_counting", dataset_config=small, size=60, seed=0, split="eval", train_size=200)
    with pytest.raises(ConfigError, match="needs train_size"):
        generate_rows("chain_sum", size=4, split="eval")


def test_config_mistakes_are_one_config_error_each():
    with pytest.raises(ConfigError, match="Did you mean 'chain_sum'"):
        generate_rows("chain_sm", size=2)
    with pytest.raises(ConfigError, match="min_term: chain_sum has no such generator keyword. Did you mean 'min_terms'"):
        generate_rows("chain_sum", dataset_config={"min_term": 2}, size=2)
    with pytest.raises(ConfigError, match="max_terms must be >= min_terms"):
        generate_rows("chain_sum", dataset_config={"min_terms": 5, "max_terms": 2}, size=2)
    with pytest.raises(ConfigError, match="answer_format='box' must be one of"):
        generate_rows("chain_sum", size=2, answer_format="box")
    with pytest.raises(ConfigError, match="appears twice in the mix"):
        generate_rows([{"name": "chain_sum"}, {"name": "chain_sum"}], size=2)
    with pytest.raises(ConfigError, match=r"mix\[0\].weight=0 must be a number > 0"):
        generate_rows([{"name": "chain_sum", "weight": 0}], size=2)
    with pytest.raises(ConfigError, match="seed: set the split's seed/size"):
        generate_rows("chain_sum", dataset_config={"seed": 3}, size=2)
    # the server checks its dataset keys when it is built (a config mistake fails at start, not per rollout)
    with pytest.raises(ConfigError, match="Did you mean 'leg_counting'"):
        ReasoningGymResourceServer("r", ReasoningGymConfig(dataset="leg_count"), Directory())
    with pytest.raises(ConfigError, match="dataset_config is set without dataset"):
        ReasoningGymConfig(dataset_config={"min_terms": 2})
    assert get_server_class("resources_servers", "reasoning_gym") is ReasoningGymResourceServer


def test_a_row_without_the_entry_is_a_verifier_failure_not_a_zero():
    async def body():
        server = ReasoningGymResourceServer("reasoning", ReasoningGymConfig(), Directory())
        await server.start()
        transport = Transport(allow_local=False)
        try:
            row = {"responses_create_params": {"input": []}, "expected_answer": "5", "response": reply("<answer>5</answer>")}
            with pytest.raises(HTTPStatusError) as e:
                await transport.post(f"{server.url}/verify", row)
            # a bad request (HTTP 400): the agent turns it into a failed rollout, never a reward of 0
            assert e.value.status == 400 and "has no 'reasoning_gym'" in str(e.value)
        finally:
            await transport.close()
            await server.stop()

    asyncio.run(body())


def test_instruction_replaces_the_text_or_wraps_the_question():
    after = generate_rows("chain_sum", dataset_config=CHAIN, size=1, seed=7, instruction="Answer in <answer></answer>.")
    assert after[0]["responses_create_params"]["input"][0]["content"] == (
        "State the final answer to the following arithmetic problem: 6 + 0 - 1 =\n\nAnswer in <answer></answer>.")
    template = generate_rows("chain_sum", dataset_config=CHAIN, size=1, seed=7, answer_format="boxed",
                             instruction="Q: {question}\nA: think, then \\boxed{}.")
    assert template[0]["responses_create_params"]["input"][0]["content"] == (
        "Q: State the final answer to the following arithmetic problem: 6 + 0 - 1 =\nA: think, then \\boxed{}.")
    assert template[0]["reasoning_gym"]["answer_format"] == "boxed"
