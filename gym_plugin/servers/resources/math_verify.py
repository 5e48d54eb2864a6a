"""``resources_servers / math_verify``: math answers checked by value (numeric or symbolic equivalence).

The prediction is the final assistant message; the gold is the row's ``expected_answer``. A fast path handles
the common case without sympy: when the ``\\boxed{}`` content (or the whole message) and the gold are plain
numbers ("42", "-3.5", "1,000"), they are compared as numbers (relative tolerance 1e-9). With a numeric gold
and no ``\\boxed{}``, the answer is the message's last number ("The answer is 13." -> 13): free text is not
evaluated, so repeating the question's "9 + 4" scores 0. Everything else goes to
the ``math_verify`` package (``parse`` both, ``verify(gold, prediction)``): LaTeX, fractions, expressions, sets.

math_verify bounds its work with ``signal.alarm``, which only works in the main thread. In the main thread the
server passes its timeout to math_verify; elsewhere it disables math_verify's timeout and runs the check in a
worker thread, bounded by ``asyncio.wait_for``. A timeout is a verifier failure
(raised: the rollout fails), never a reward of 0; a prediction that cannot be parsed scores 0.
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass
from typing import Any, Mapping

from gym_plugin.errors import VerifierError
from gym_plugin.servers.registry import register
from gym_plugin.servers.resources.base import (
    ResourceServer,
    ResourceServerConfig,
    expected_answer,
    extract_boxed,
    final_text,
)

_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_ANY_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|-?\d+(?:\.\d+)?|-?\.\d+")
"""Numbers inside free text (thousands separators allowed), for the last-number rule."""


def plain_number(text: str) -> float | None:
    """'42' -> 42.0, ' -3.5 ' -> -3.5, '1,000' -> 1000.0, '$7$' -> 7.0; None for anything else."""
    s = text.strip().strip("$").strip()
    if _PLAIN_NUMBER.fullmatch(s):
        return float(s)
    if _THOUSANDS.fullmatch(s):
        return float(s.replace(",", ""))
    return None


def numbers_equal(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


@dataclass
class MathVerifyConfig(ResourceServerConfig):
    """YAML keys under ``resources_servers: math_verify:``."""

    timeout_s: int = 5
    """math_verify's per-parse / per-compare time limit, whole seconds (main thread only, see module doc)."""
    float_rounding: int = 6
    """Decimal places math_verify rounds floats to before comparing."""


@register("resources_servers", "math_verify")
class MathVerifyResourceServer(ResourceServer):
    Config = MathVerifyConfig

    _mv: Any = None

    async def on_start(self) -> None:
        self._load()

    def _load(self):
        if MathVerifyResourceServer._mv is None:
            import math_verify  # sympy + latex parser: ~1 s to import, so only when this server is used

            MathVerifyResourceServer._mv = math_verify
        return MathVerifyResourceServer._mv

    async def verify_row(self, row: Mapping[str, Any], response: Mapping[str, Any], state: dict | None) -> dict:
        gold = expected_answer(row, self.name)
        text = final_text(response)
        boxed = extract_boxed(text)
        candidate = boxed if boxed is not None else text
        pred_num = plain_number(candidate)
        gold_num = plain_number(gold)
        if gold_num is not None and boxed is None and pred_num is None:
            # A numeric gold and no \boxed{}: the answer is the message's last number. Handing free text to
            # math_verify would evaluate any expression in it, so echoing the question ("what is 9 + 4") would
            # score as 13: a reward a policy can learn to hack.
            numbers = _ANY_NUMBER.findall(text)
            pred_num = plain_number(numbers[-1]) if numbers else None
            if pred_num is None:
                return {"reward": 0.0, "extracted_answer": ""}
            candidate = numbers[-1]
        if pred_num is not None and gold_num is not None:
            return {"reward": 1.0 if numbers_equal(pred_num, gold_num) else 0.0, "extracted_answer": candidate.strip()}
        if threading.current_thread() is threading.main_thread():
            # signal.alarm works here: math_verify bounds each parse/compare itself.
            return self._verify_symbolic(gold, text, self.config.timeout_s)
        # Not the main thread (e.g. servers run on a background event loop): signal.alarm is unavailable, so
        # run it in a worker thread without math_verify's timeout and bound the wait here instead.
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(None, self._verify_symbolic, gold, text, None), self.config.timeout_s
            )
        except asyncio.TimeoutError as e:
            raise VerifierError(
                f"{self.name}: math_verify did not finish within {self.config.timeout_s} s comparing "
                f"{gold!r} with the model's answer; raise timeout_s or check the row"
            ) from e

    def _verify_symbolic(self, gold: str, text: str, timeout: int | None) -> dict:
        mv = self._load()
        from math_verify.errors import TimeoutException

        try:
            gold_parsed = mv.parse(gold, parsing_timeout=timeout, raise_on_error=True)
            if not gold_parsed:
                gold_parsed = mv.parse(f"${gold}$", parsing_timeout=timeout, raise_on_error=True)
        except TimeoutException as e:
            raise VerifierError(f"{self.name}: parsing the expected answer {gold!r} timed out after {timeout} s") from e
        if not gold_parsed:
            raise VerifierError(
                f"{self.name}: math_verify cannot parse the expected answer {gold!r}; write it as a number or LaTeX"
            )
        try:
            pred_parsed = mv.parse(text, parsing_timeout=timeout, raise_on_error=True)
        except TimeoutException as e:
            raise VerifierError(f"{self.name}: parsing the model's answer timed out after {timeout} s") from e
        except Exception:  # an unparseable prediction is a wrong answer, not a verifier failure
            pred_parsed = []
        extracted = str(pred_parsed[1]) if len(pred_parsed) > 1 else (str(pred_parsed[0]) if pred_parsed else "")
        if not pred_parsed:
            return {"reward": 0.0, "extracted_answer": extracted}
        try:
            ok = mv.verify(gold_parsed, pred_parsed, float_rounding=self.config.float_rounding,
                           timeout_seconds=timeout, raise_on_error=True)
        except TimeoutException as e:
            raise VerifierError(f"{self.name}: comparing {gold!r} with {extracted!r} timed out after {timeout} s") from e
        except Exception:  # sympy could not compare these two: not equal
            ok = False
        return {"reward": 1.0 if ok else 0.0, "extracted_answer": extracted}
