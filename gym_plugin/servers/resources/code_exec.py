"""``resources_servers / code_exec``: run the model's Python answer against the row's tests in a sandbox.

The answer is the last fenced code block of the final assistant message tagged ``python``/``py``/``python3``
(else the last untagged block). The row's ``tests`` (key configurable) is a list of statements, usually
``assert`` lines, each run in the answer's namespace, or one test script (a string). The sandbox
(`gym_plugin.servers.resources.sandbox`) enforces CPU, memory and wall-clock limits, no network, a private temp dir.

Scoring:

- every test passes -> ``reward`` 1.0;
- a test fails, the answer raises, has no code block, loops past its CPU/wall budget, exhausts memory, or tries
  a forbidden operation (files outside its dir, sockets, processes) -> ``reward`` 0.0: that is the answer's fault;
- the sandbox cannot run (interpreter missing, no free sandbox uid), the machine was so overloaded that the
  answer was starved of CPU until the wall limit, or the row has no usable tests -> the verifier *raises*
  (VerifierError / ProtocolError): the rollout becomes a failure record and is never scored 0.

The reply adds ``extracted_code``, ``sandbox_status`` (passed|failed|timeout|memory|crashed|forbidden),
``tests_passed``, ``tests_total``, ``sandbox_detail`` and a truncated ``sandbox_stderr``.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any, Mapping

from gym_plugin.errors import ProtocolError, SandboxError, VerifierError, truncate
from gym_plugin.servers.registry import register
from gym_plugin.servers.resources.base import ResourceServer, ResourceServerConfig, final_text
from gym_plugin.servers.resources.sandbox import probe_isolation, run_python_async

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\r?\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = ("python", "py", "python3")


def extract_code(text: str) -> str | None:
    """The last ```python block of `text` (else the last untagged ``` block), or None when there is none.

    '```python\\nx = 1\\n```' -> 'x = 1\\n'. Blocks tagged with another language are not Python and are skipped;
    an unterminated block (generation cut off) does not count.
    """
    tagged, untagged = None, None
    for m in _FENCE.finditer(text):
        tag = m.group(1).lower()
        if tag in _PYTHON_TAGS:
            tagged = m.group(2)
        elif tag == "":
            untagged = m.group(2)
    return tagged if tagged is not None else untagged


def row_tests(row: Mapping[str, Any], key: str, server: str) -> str | list[str]:
    """The row's tests (a non-empty list of strings or a non-empty string); ProtocolError otherwise."""
    tests = row.get(key)
    if isinstance(tests, str) and tests.strip():
        return tests
    if isinstance(tests, list) and tests and all(isinstance(t, str) and t.strip() for t in tests):
        return tests
    raise ProtocolError(
        f"{server}: the row's {key!r} must be a non-empty list of Python statements (e.g. "
        f"[\"assert add(1, 2) == 3\"]) or a test script string; got {truncate(tests, 200)}. Fix the dataset row."
    )


@dataclass
class CodeExecConfig(ResourceServerConfig):
    """YAML keys under ``resources_servers: code_exec:``."""

    tests_key: str = "tests"
    """Row key holding the tests (list of statements, or a script string)."""
    cpu_time_s: float = 5.0
    """CPU budget of one run (answer + tests), seconds; whole seconds, rounded up."""
    wall_time_s: float | None = None
    """Wall-clock budget of one run; default 2 x cpu_time_s + 1."""
    memory_mb: int = 1024
    """Address-space limit of the child interpreter, MB."""
    max_output_bytes: int = 16 * 1024
    """stdout/stderr kept per run; more is dropped (and a flood of 16x this is killed)."""
    max_concurrency: int | None = None
    """Sandboxes running at once on this server's event loop; default one per CPU core."""
    stderr_chars: int = 2000
    """Characters of the child's stderr (traceback) put in the reply's ``sandbox_stderr``."""
    code_chars: int = 20000
    """Characters of the extracted code echoed in ``extracted_code``."""
    python: str | None = None
    """Interpreter the sandbox runs; default: this one, or the system python3 when the sandbox uid cannot run
    this one (see gym_plugin.servers.resources.sandbox.probe_isolation)."""


@register("resources_servers", "code_exec")
class CodeExecResourceServer(ResourceServer):
    Config = CodeExecConfig

    async def on_start(self) -> None:
        # Probe once, off the event loop (it starts two short child processes), so the first /verify does not.
        await asyncio.get_running_loop().run_in_executor(None, probe_isolation)

    async def verify_row(self, row: Mapping[str, Any], response: Mapping[str, Any], state: dict | None) -> dict:
        cfg = self.config
        tests = row_tests(row, cfg.tests_key, self.name)
        code = extract_code(final_text(response))
        if code is None:
            return {"reward": 0.0, "extracted_code": "", "sandbox_status": "failed", "tests_passed": 0,
                    "tests_total": len(tests) if isinstance(tests, list) else 1,
                    "sandbox_detail": "no ```python code block in the final assistant message", "sandbox_stderr": ""}
        try:
            result = await run_python_async(
                code, tests, cpu_time_s=cfg.cpu_time_s, wall_time_s=cfg.wall_time_s, memory_mb=cfg.memory_mb,
                max_output_bytes=cfg.max_output_bytes, max_concurrency=cfg.max_concurrency, python=cfg.python,
            )
        except SandboxError as e:
            raise VerifierError(f"{self.name}: the sandbox could not run the answer: {e}") from e
        if result.starved:
            raise VerifierError(
                f"{self.name}: the answer was starved of CPU until the wall-clock limit ({result.detail}); the "
                f"machine is overloaded, so this is not scored. Lower max_concurrency or raise wall_time_s."
            )
        return {
            "reward": 1.0 if result.passed else 0.0,
            "extracted_code": truncate(code, cfg.code_chars),
            "sandbox_status": result.status,
            "tests_passed": result.tests_passed,
            "tests_total": result.tests_total,
            "sandbox_detail": result.detail,
            "sandbox_stderr": result.stderr[-cfg.stderr_chars:] if cfg.stderr_chars > 0 else "",
        }
