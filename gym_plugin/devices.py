"""Where a model runs: ``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``"cuda:<index>"``, one rule for the recipe
(``model.device``) and the embedded policy server (``device``).

``"auto"`` is a CUDA GPU when torch sees one, else the CPU. ``"cuda"`` is the process's GPU (``cuda:<local
rank>`` under torchrun); asking for CUDA on a machine without it is a ConfigError that names the fix, never a
silent fall back to the CPU. The names are checked without importing torch (``check_device``), so a config
can be validated before the model stack loads.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from gym_plugin.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:<index>")
"""What a device setting accepts."""

_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def check_device(value: object, key: str = "device") -> list[str]:
    """Problems with a device setting (empty if it is one of ``DEVICE_CHOICES``); no torch import."""
    if isinstance(value, str) and (value in ("auto", "cpu", "cuda") or _CUDA_INDEX.fullmatch(value)):
        return []
    return [f"{key}={value!r} is not a device: use one of {list(DEVICE_CHOICES)} (e.g. {key}=cuda or {key}=cpu)."]


def wants_cuda(value: str) -> bool | None:
    """True for ``cuda``/``cuda:N``, False for ``cpu``, None for ``auto`` (decided by what torch sees)."""
    return None if value == "auto" else value.startswith("cuda")


def resolve_device(value: str, local_rank: int = 0, key: str = "device") -> torch.device:
    """The torch device of a setting. ``cuda`` (and ``auto`` on a GPU machine) is ``cuda:<local_rank>``.

    ConfigError when the name is not a device, when CUDA is asked for but torch sees no GPU, or when the index is
    past the GPUs torch sees.
    """
    import torch

    problems = check_device(value, key)
    if problems:
        raise ConfigError(problems)
    want = wants_cuda(value)
    available = torch.cuda.is_available()
    if want is False or (want is None and not available):
        return torch.device("cpu")
    if not available:
        raise ConfigError(
            f"{key}={value} asks for a CUDA GPU, but torch sees none (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, built with CUDA {torch.version.cuda}). Set {key}=cpu (or auto), or install a "
            "CUDA build of torch on a machine with an NVIDIA GPU."
        )
    match = _CUDA_INDEX.fullmatch(value)
    index = int(match.group(1)) if match else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"{key}={value}: GPU index {index} does not exist here (torch sees {count} GPU(s): "
                          f"cuda:0..cuda:{count - 1}). Set {key}=cuda (the process's own GPU) or a smaller index.")
    return torch.device("cuda", index)
