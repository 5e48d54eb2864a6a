"""Trainer -> policy weight sync after each training step: ``inprocess | checkpoint | vllm_reload | vllm_nccl``.

Every implementation has the same three calls (``WeightSync``): ``await check()`` once before training (the
routes it needs exist on every replica; a missing one is named with the server flag that adds it, instead of
failing after the first step), ``await sync(model, version)`` pushes the trainer's current weights to every
policy replica and returns only when all of them serve ``version``, and ``await close()``. ``open_weight_sync``
builds one and runs its check. Only rank 0 of a torchrun job syncs (the recipe sees to that).

- ``InProcessWeightSync(server)``: the embedded policy lives in the trainer's process. Its weights are copied
  in place with ``server.update_weights(state_dict)`` (no serialization). The server keeps its own copy of the
  model, so overlapped collection never samples from weights the optimizer is changing.
- ``CheckpointWeightSync(base_urls, directory)``: an embedded policy server in another process (or host with
  shared disk). The state dict is written once as safetensors, then ``POST {root}/update_weights_from_path``
  ``{"path", "policy_version"}`` goes to every replica; each reply must report a version above its last one.
- ``VLLMReloadWeightSync`` / ``VLLMNCCLWeightSync`` (``gym_plugin.weight_sync.vllm``): vLLM servers, through a
  safetensors folder and gym_plugin's worker extension (any build, CPU included), or vLLM's NCCL weight
  transfer (GPU).

The server roots are the policy ``base_urls`` without a trailing ``/v1`` (vLLM and the embedded server serve these
routes at the root).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from gym_plugin.errors import ConfigError, did_you_mean
from gym_plugin.weight_sync.base import (
    WEIGHT_SYNC_KINDS,
    CheckpointWeightSync,
    InProcessWeightSync,
    NoWeightSync,
    WeightSync,
    WeightSyncConfig,
    WeightSyncError,
    check_routes,
    detached_state_dict,
    server_root,
    unwrap_model,
)
from gym_plugin.weight_sync.vllm import VLLMNCCLWeightSync, VLLMReloadWeightSync

def build_weight_sync(config: WeightSyncConfig, *, server: Any = None, base_urls: Iterable[str] = (),
                      run_dir: str | os.PathLike | None = None) -> WeightSync:
    """The ``WeightSync`` for ``config.kind`` (not checked yet: ``open_weight_sync`` also runs ``check()``).
    ``server``: the embedded server object (inprocess); ``base_urls``: policy endpoints (the other kinds)."""
    kind = config.kind
    if kind == "inprocess":
        if server is None:
            raise ConfigError(
                "weight_sync.kind=inprocess needs the embedded policy (policy=embedded); with policy.base_urls set, "
                "use weight_sync=checkpoint (embedded server elsewhere) or weight_sync=vllm_reload / vllm_nccl (vLLM)."
            )
        return InProcessWeightSync(server)
    if kind in ("checkpoint", "vllm_reload"):
        directory = config.directory or (Path(run_dir) / "weight_sync" if run_dir else None)
        if directory is None:
            raise ConfigError(f"weight_sync.directory is not set (and no run_dir to default to); set it to a folder "
                              f"every policy replica can read (weight_sync={kind}).")
        if kind == "vllm_reload":
            return VLLMReloadWeightSync(base_urls, directory, config)
        return CheckpointWeightSync(base_urls, directory, keep_last=config.keep_last, timeout_s=config.timeout_s)
    if kind == "vllm_nccl":
        return VLLMNCCLWeightSync(base_urls, config)
    if kind == "none":
        return NoWeightSync()
    raise ConfigError(f"weight_sync.kind={kind!r} is unknown.{did_you_mean(kind, WEIGHT_SYNC_KINDS)} "
                      f"Use one of {list(WEIGHT_SYNC_KINDS)}.")


async def open_weight_sync(config: WeightSyncConfig, *, server: Any = None, base_urls: Iterable[str] = (),
                           run_dir: str | os.PathLike | None = None) -> WeightSync:
    """``build_weight_sync`` + ``await check()``: fails before training when a replica cannot take updates."""
    sync = build_weight_sync(config, server=server, base_urls=base_urls, run_dir=run_dir)
    try:
        await sync.check()
    except BaseException:
        await sync.close()
        raise
    return sync


__all__ = [
    "WEIGHT_SYNC_KINDS", "WeightSyncError", "WeightSyncConfig", "WeightSync", "NoWeightSync",
    "InProcessWeightSync", "CheckpointWeightSync", "VLLMReloadWeightSync", "VLLMNCCLWeightSync",
    "build_weight_sync", "open_weight_sync", "check_routes", "detached_state_dict", "server_root", "unwrap_model",
]
