"""The ``cuda`` tests: the step and the embedded engine on a CUDA GPU, in float32 and bfloat16.

Without a GPU they skip with the reason (they are not peer tests: GYM_PLUGIN_REQUIRE_PEERS leaves their skips
alone). ``GYM_PLUGIN_CUDA_TESTS_ON_CPU=1`` runs them on the CPU instead: bench/gpu_check.sh --dry-run does, in CI,
so that the code a lent GPU runs cannot rot between loans.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_CPU_ENV = "GYM_PLUGIN_CUDA_TESTS_ON_CPU"


@pytest.fixture
def device() -> torch.device:
    """The GPU, or the CPU under GYM_PLUGIN_CUDA_TESTS_ON_CPU=1; a skip otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get(ON_CPU_ENV) == "1":
        return torch.device("cpu")
    pytest.skip(f"no CUDA GPU (torch.cuda.is_available() is False with torch {torch.__version__}); "
                f"bench/gpu_check.sh runs these on a GPU, {ON_CPU_ENV}=1 on the CPU")
