"""torchrun helpers: process-group setup from the environment, prompt-group sharding, reductions.

``torchrun --nproc_per_node N recipes/grpo.py`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; ``init_distributed()`` reads them (gloo on CPU, nccl on GPU) and is a no-op for a plain
``python`` launch. Everything here works unchanged with one process (world size 1), so the recipe has no
``if distributed`` branches beyond "only rank 0 writes".
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

from gym_plugin.devices import resolve_device
from gym_plugin.errors import ConfigError, GymPluginError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    """Global rank (0 for a plain launch)."""
    world_size: int
    """Number of processes (1 for a plain launch)."""
    local_rank: int
    """Rank on this host (picks the GPU)."""
    device: torch.device
    """Where this rank's model runs (``model.device``): cuda:<local_rank> on a GPU, else cpu."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that syncs weights, logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str = "auto", timeout_s: float = 1800.0, device: str = "auto") -> DistInfo:
    """Join the torchrun job described by the environment, or return a single-process DistInfo.

    ``backend``: "auto" (nccl when the model runs on CUDA, else gloo), "gloo" or "nccl". ``timeout_s`` bounds
    every collective (a rank that dies makes the others fail after this long instead of hanging forever).
    ``device`` (the recipe's ``model.device``, gym_plugin.devices): "auto" (a GPU when torch sees one and the
    backend is not gloo), "cpu", "cuda" (``cuda:<LOCAL_RANK>``) or "cuda:N" (one process only).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"distributed.backend={backend!r} must be 'auto', 'gloo' or 'nccl'.")
    if world > 1 and device.startswith("cuda:"):
        raise ConfigError(f"model.device={device} under torchrun ({world} ranks) would put every rank on one GPU; "
                          "set model.device=cuda (each rank takes cuda:<LOCAL_RANK>) or auto.")
    # an explicit gloo backend with device=auto keeps its old meaning: train on the CPU
    torch_device = resolve_device("cpu" if backend == "gloo" and device == "auto" else device, local_rank,
                                  key="model.device")
    if backend == "auto":
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("distributed.backend=nccl needs CUDA GPUs; use distributed.backend=gloo on CPU.")
    if backend == "nccl" and torch_device.type != "cuda":
        raise ConfigError(f"distributed.backend=nccl with model.device={device}: NCCL reduces CUDA tensors only; "
                          "set model.device=cuda (or auto), or distributed.backend=gloo to train on the CPU.")
    if world > 1 and not dist.is_initialized():
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=torch_device)


def shutdown_distributed() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_groups(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's share of a step's prompts: whole prompts (each becomes a complete group of G rollouts on
    one rank), dealt round-robin so shares differ by at most one. ``items`` must be the same on every rank.

    Example: 5 prompts on 2 ranks -> rank 0 gets [p0, p2, p4], rank 1 gets [p1, p3].
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if len(items) < world_size:
        raise ConfigError(
            f"train.prompts_per_step={len(items)} is smaller than the number of ranks ({world_size}): a rank would "
            f"get no prompt group. Set train.prompts_per_step >= {world_size}."
        )
    return list(items[rank::world_size])


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects; e.g. the run directory, the policy URL)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (e.g. per-rank rollout records for rank 0's log)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sums(values: dict[str, float], device: torch.device | None = None) -> dict[str, float]:
    """Sum each value over ranks (one collective for the whole dict; keys must match on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device or "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def wrap_model(model: torch.nn.Module, info: DistInfo, strategy: str = "ddp") -> torch.nn.Module:
    """Wrap for data parallel training: "ddp" or "fsdp" (FSDP2 ``fully_shard``: each decoder layer, then the
    root), on GPUs (nccl) or CPUs (gloo). Returns ``model`` unchanged for a single process."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.local_rank] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for layer in getattr(getattr(model, "model", model), "layers", []):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ConfigError(f"distributed.strategy={strategy!r} must be 'ddp' or 'fsdp'.")


class RankFailedError(GymPluginError):
    """A rank failed where every rank meets (e.g. its collection); raised on every rank with the same message."""


def raise_if_any_rank_failed(error: BaseException | None, where: str) -> None:
    """Every rank calls this at the same point with the exception it caught there (or None). If any rank failed,
    every rank raises one ``RankFailedError`` naming the ranks and their errors (the failing rank chains its
    own exception), so a failure on one rank ends the job at once instead of leaving the others in the next
    collective until its timeout. Single process: re-raises ``error`` as it is."""
    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return
    summary = None if error is None else f"{type(error).__name__}: {error}"[:2000]
    reports = all_gather_objects(summary)
    failed = [(rank, text) for rank, text in enumerate(reports) if text is not None]
    if not failed:
        return
    lines = "; ".join(f"rank {rank}: {text}" for rank, text in failed)
    raise RankFailedError(
        f"{where} failed on {len(failed)} of {len(reports)} ranks, so every rank stops here: {lines}"
    ) from error


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The complete (unsharded) state dict, names without wrapper prefixes: on every rank for DDP or one process;
    for FSDP the shards are gathered (a collective: call it on every rank) into CPU tensors on rank 0, and the
    other ranks get an empty dict."""
    from gym_plugin.weight_sync import unwrap_model

    inner = unwrap_model(model)
    if any(type(p).__name__ == "DTensor" for p in inner.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return inner.state_dict()


def params_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name and bytes: equal on two ranks exactly when their parameters are
    bit-identical (what DDP promises). FSDP-sharded parameters are gathered first (a collective: call it on
    every rank)."""
    import hashlib

    from gym_plugin.weight_sync import unwrap_model

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in unwrap_model(model).named_parameters():
            full = getattr(p, "full_tensor", None)  # DTensor (FSDP2)
            tensor = full() if callable(full) else p
            h.update(name.encode())
            h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
