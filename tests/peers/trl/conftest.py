"""TRL 1.16's GRPOTrainer against gym_plugin.trl (marker ``trl``). Without an importable ``trl`` every test here is
skipped with the reason (``pip install -e ".[trl]"``); CI installs it, and GYM_PLUGIN_REQUIRE_PEERS=1 turns such a
skip into a failure there (tests/conftest.py)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("trl", reason="TRL is not installed: pip install -e '.[trl]' (trl==1.16.0)")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL 1.16; we know
