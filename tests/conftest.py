"""Shared pytest hooks.

Tests against the real peers (markers ``vllm``, ``nemo_gym``, ``nemo_rl``, ``trl``) skip with the reason when their peer is
absent, as on a user's clone. In CI the peers are installed, so a skip there would hide a broken install behind a
green run: with ``GYM_PLUGIN_REQUIRE_PEERS=1`` (set by .ci/run) such a skip is reported as a failure instead.
"""

from __future__ import annotations

import os

import pytest

PEER_MARKERS = ("vllm", "nemo_gym", "nemo_rl", "trl")


def _require_peers() -> bool:
    return os.environ.get("GYM_PLUGIN_REQUIRE_PEERS") == "1"


def _fail_skip(report) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"GYM_PLUGIN_REQUIRE_PEERS=1, but this test against a real peer was skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _require_peers() and any(item.get_closest_marker(m) for m in PEER_MARKERS):
        _fail_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # a whole module skipped at import (pytest.importorskip) never becomes test items
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _require_peers() and report.nodeid.startswith("tests/peers/"):
        _fail_skip(report)
