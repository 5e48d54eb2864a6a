"""Without reasoning-gym installed, a reasoning-gym task is one MissingExtraError naming the 'reasoning' extra."""

from __future__ import annotations

import sys

import pytest

from gym_plugin.errors import ConfigError
from gym_plugin.reasoning_tasks import MissingExtraError, generate_rows


def test_missing_reasoning_gym_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # `import reasoning_gym` now raises ImportError
    with pytest.raises(MissingExtraError, match=r"the 'reasoning' extra .*pip install 'gym_plugin\[reasoning\]'") as e:
        generate_rows("chain_sum", size=2)
    assert isinstance(e.value, ConfigError)  # the CLI and the recipe print it as one error block, exit 2
