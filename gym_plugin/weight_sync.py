"""Trainer -> policy weight sync after each training step: ``inprocess | checkpoint | vllm_nccl``.

Every implementation has the same two calls (``WeightSync``): ``await sync(model, version)`` pushes the trainer's
current weights to every policy replica and returns only when all of them serve ``version``;
``await close()`` releases what ``sync`` opened. Only rank 0 of a torchrun job syncs (the recipe sees to that).

- ``InProcessWeightSync(server)``: the embedded policy lives in the trainer's process. Its weights are copied
  in place with ``server.update_weights(state_dict)`` (no serialization). The server keeps its own copy of the
  model, so overlapped collection never samples from weights the optimizer is changing.
- ``CheckpointWeightSync(base_urls, directory)``: an embedded policy server in another process (or host with
  shared disk). The state dict is written once as safetensors, then ``POST {root}/update_weights_from_path``
  ``{"path", "policy_version"}`` goes to every replica; each reply must report a version above its last one.
- ``VLLMWeightSync(base_urls, ...)``: vLLM's own weight-transfer API (vLLM >= 0.16, server started with
  ``VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --weight-transfer-config '{"backend": "nccl"}'``). The HTTP control
  plane is driven here; NCCL moves the tensors (``NCCLSender``, vLLM imported lazily, optional dependency).
  Routes and bodies as in vLLM's ``vllm/entrypoints/serve/dev/rlhf/api_router.py`` and its example
  ``examples/rl/rlhf_http_nccl.py`` (read for this module, not copied):
    GET  /get_world_size                 -> {"world_size": n}  (inference workers of one replica)
    POST /init_weight_transfer_engine    {"init_info": {master_address, master_port, rank_offset, world_size}}
    POST /pause, /resume                 (optional: hold generation while weights change)
    POST /start_weight_update            {"is_checkpoint_format": true}
    POST /update_weights                 {"update_info": {names, dtype_names, shapes, packed}}  (per chunk;
                                         blocks until that chunk's NCCL broadcast arrived)
    POST /finish_weight_update           {"weight_version": "<str>"}
    GET  /weight_info                    -> {"weight_version": "<str>"}  (used to verify every replica)
  All replicas join ONE NCCL group: the trainer is rank 0, replica ``j`` gets ``rank_offset = 1 + sum of the
  world sizes before it``; a single broadcast per chunk reaches every replica at once.

The server roots are the policy ``base_urls`` without a trailing ``/v1`` (vLLM serves these routes at the root).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch

from gym_plugin.errors import ConfigError, EndpointError, did_you_mean
from gym_plugin.http import Transport

logger = logging.getLogger(__name__)

WEIGHT_SYNC_KINDS = ("inprocess", "checkpoint", "vllm_nccl", "none")


class WeightSyncError(EndpointError):
    """A policy replica did not take the new weights (HTTP error, wrong version). ``url`` names the replica."""


@dataclasses.dataclass
class WeightSyncConfig:
    """The ``weight_sync`` config group (conf/weight_sync/*.yaml)."""

    kind: str = "inprocess"
    """'inprocess' (embedded policy in this process) | 'checkpoint' (embedded server elsewhere: safetensors +
    POST /update_weights_from_path) | 'vllm_nccl' (vLLM weight-transfer API) | 'none' (never sync; evaluation
    or a frozen policy)."""
    directory: str | None = None
    """checkpoint: where the safetensors file is written (must be readable by every replica); default
    ``<run_dir>/weight_sync``."""
    keep_last: int = 1
    """checkpoint: how many weight files to keep on disk (older ones are deleted once every replica moved on)."""
    master_address: str = "127.0.0.1"
    """vllm_nccl: address of this trainer, reachable from every vLLM worker (NCCL rendezvous)."""
    master_port: int = 0
    """vllm_nccl: rendezvous port (0 = pick a free one)."""
    chunk_bytes: int = 512 * 1024 * 1024
    """vllm_nccl: parameters are announced to vLLM in chunks of at most this many bytes (one /update_weights
    call and one broadcast per chunk), bounding the receive buffers."""
    packed: bool = True
    """vllm_nccl: vLLM's packed broadcast (batches small tensors; same flag on both sides)."""
    pause_generation: bool = False
    """vllm_nccl: POST /pause before and /resume after the update (needed when collection overlaps syncing)."""
    verify_version: bool = True
    """vllm_nccl: after finishing, GET /weight_info on every replica and check it reports the new version
    (turn off for vLLM builds without that route)."""
    timeout_s: float = 600.0
    """Timeout of one control-plane request (update_weights waits for the broadcast), seconds."""


def server_root(base_url: str) -> str:
    """'http://h:8000/v1' -> 'http://h:8000': vLLM and the embedded server serve control routes at the root."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP/FSDP/compile wrappers (parameter names without ``module.`` prefixes)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def detached_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as CPU tensors, safe to serialize: tied weights (e.g. ``lm_head.weight`` sharing
    ``embed_tokens.weight``) become separate copies because safetensors refuses shared storage, and every key
    stays present so the receiver can ``load_state_dict`` strictly."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in unwrap_model(model).state_dict().items():
        t = tensor.detach().to("cpu")
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[name] = t.clone() if key in seen else t.contiguous()
        seen.add(key)
    return out


class WeightSync(Protocol):
    """What the recipe calls after each optimizer step (rank 0 only)."""

    async def sync(self, model: torch.nn.Module, version: int) -> int:
        """Push ``model``'s weights to every replica as policy ``version``; returns the version they report."""
        ...

    async def close(self) -> None:
        """Release connections / process groups."""
        ...


class NoWeightSync:
    """``kind: none``: the policy keeps its weights (evaluation, or a frozen sampler)."""

    async def sync(self, model: torch.nn.Module, version: int) -> int:
        return version

    async def close(self) -> None:
        return None


class InProcessWeightSync:
    """Copy the trainer's weights into an embedded policy server of this process.

    ``server`` is anything with ``update_weights(state_dict) -> int`` (``EmbeddedPolicyServer``). The copy is a
    ``load_state_dict`` into the server's own module (no disk, no HTTP).
    """

    def __init__(self, server: Any):
        if not callable(getattr(server, "update_weights", None)):
            raise ConfigError(
                f"weight_sync.kind=inprocess needs an embedded policy server object with update_weights(); got "
                f"{type(server).__name__}. Use weight_sync=checkpoint or vllm_nccl for servers in other processes."
            )
        self.server = server

    async def sync(self, model: torch.nn.Module, version: int) -> int:
        state = {k: v.detach() for k, v in unwrap_model(model).state_dict().items()}
        # update_weights waits for the batch being generated to finish: off the event loop.
        reported = await asyncio.to_thread(self.server.update_weights, state)
        return int(reported) if reported is not None else version

    async def close(self) -> None:
        return None


class CheckpointWeightSync:
    """Write the weights as one safetensors file, then tell every replica to load it.

    The file is written to a temporary name and renamed, so a replica never reads a half-written file. Each
    version gets its own file (``policy_v{version:06d}.safetensors``); files older than ``keep_last`` are
    removed after every replica confirmed the newer one.
    """

    def __init__(self, base_urls: Iterable[str], directory: str | os.PathLike, *, keep_last: int = 1,
                 timeout_s: float = 600.0, transport: Transport | None = None):
        self.base_urls = [u.rstrip("/") for u in base_urls]
        if not self.base_urls:
            raise ConfigError("weight_sync.kind=checkpoint needs at least one policy base_url (policy.base_urls).")
        self.directory = Path(directory)
        self.keep_last = max(1, int(keep_last))
        self.timeout_s = timeout_s
        self.transport = transport or Transport(timeout_s=timeout_s)
        self._written: list[Path] = []
        self._versions: dict[str, int] = {}
        """Last policy_version each replica reported."""

    def write(self, model: torch.nn.Module, version: int) -> Path:
        """Save the state dict as ``policy_v{version}.safetensors`` (atomically); returns the path."""
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"policy_v{version:06d}.safetensors"
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        save_file(detached_state_dict(model), str(tmp), metadata={"policy_version": str(version)})
        os.replace(tmp, path)
        return path

    async def sync(self, model: torch.nn.Module, version: int) -> int:
        path = await asyncio.to_thread(self.write, model, version)
        body = {"path": str(path.resolve()), "policy_version": version}

        async def one(url: str) -> int:
            target = f"{server_root(url)}/update_weights_from_path"
            try:
                reply = await self.transport.post(target, body, timeout_s=self.timeout_s)
            except EndpointError as e:
                raise WeightSyncError(
                    f"policy replica {url} did not load {path}: {e}. Check that it is an embedded policy server "
                    f"and that it can read {self.directory} (shared disk).", url=url, status=e.status
                ) from e
            data = reply.data if isinstance(reply.data, dict) else {}
            got = data.get("policy_version")
            before = self._versions.get(url)
            # The embedded server counts its own versions (+1 per load), so the check is "it moved forward",
            # not "it equals the trainer's step": a server restarted mid-run starts again from 0.
            if not isinstance(got, int) or (before is not None and got <= before):
                raise WeightSyncError(
                    f"policy replica {url} answered {data!r} after loading {path}; expected a policy_version "
                    f"greater than {before}. The replica did not take the new weights.", url=url
                )
            self._versions[url] = got
            return got

        versions = await asyncio.gather(*(one(u) for u in self.base_urls))
        if len(set(versions)) > 1:
            logger.warning("policy replicas report different versions after the sync: %s",
                           dict(zip(self.base_urls, versions)))
        self._written.append(path)
        while len(self._written) > self.keep_last:
            self._written.pop(0).unlink(missing_ok=True)
        return max(versions)

    async def close(self) -> None:
        await self.transport.close()


class WeightSender(Protocol):
    """The data plane of ``VLLMWeightSync``: moves tensors to the vLLM workers (NCCL in production)."""

    def init(self, master_address: str, master_port: int, world_size: int) -> None:
        """Join the trainer side (rank 0) of the group; blocks until every worker joined."""
        ...

    def send(self, named_tensors: list[tuple[str, torch.Tensor]], packed: bool) -> None:
        """Broadcast these tensors (the chunk just announced with /update_weights) to every worker."""
        ...


class NCCLSender:
    """vLLM's NCCL trainer engine (``NCCLWeightTransferEngine.trainer_init`` / ``trainer_send_weights``)."""

    def __init__(self) -> None:
        try:
            from vllm.distributed.weight_transfer.nccl_engine import (  # noqa: F401
                NCCLTrainerSendWeightsArgs,
                NCCLWeightTransferEngine,
            )
        except ImportError as e:
            raise ConfigError(
                "weight_sync.kind=vllm_nccl needs vLLM (>= 0.16, with vllm.distributed.weight_transfer) installed "
                f"in the trainer's environment ({type(e).__name__}: {e}). Install it with `pip install vllm` on a "
                "GPU machine, or use weight_sync=checkpoint for an embedded policy server."
            ) from None
        self._engine = NCCLWeightTransferEngine
        self._args_cls = NCCLTrainerSendWeightsArgs
        self._group = None

    def init(self, master_address: str, master_port: int, world_size: int) -> None:
        self._group = self._engine.trainer_init(
            dict(master_address=master_address, master_port=master_port, world_size=world_size)
        )

    def send(self, named_tensors: list[tuple[str, torch.Tensor]], packed: bool) -> None:
        assert self._group is not None, "NCCLSender.send before init"
        args = self._args_cls(group=self._group, packed=packed)
        self._engine.trainer_send_weights(iterator=iter(named_tensors), trainer_args=args)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]  # torch.bfloat16 -> 'bfloat16', the spelling vLLM expects


def chunk_parameters(named: list[tuple[str, torch.Tensor]], chunk_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Split ``(name, tensor)`` pairs into consecutive chunks of at most ``chunk_bytes`` (a tensor bigger than
    the limit gets a chunk of its own). Order is kept: vLLM receives tensors in announcement order."""
    chunks: list[list[tuple[str, torch.Tensor]]] = []
    current: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > chunk_bytes:
            chunks.append(current)
            current, size = [], 0
        current.append((name, t))
        size += nbytes
    if current:
        chunks.append(current)
    return chunks


class VLLMWeightSync:
    """Drive vLLM's weight-transfer control plane on every replica; ``sender`` moves the tensors.

    ``sync`` returns only after every replica finished the update (and, with ``verify_version``, reports the
    new version); any failure raises ``WeightSyncError`` naming the replica URL and the route.
    """

    def __init__(self, base_urls: Iterable[str], config: WeightSyncConfig | None = None, *,
                 sender: WeightSender | None = None, transport: Transport | None = None):
        self.config = config or WeightSyncConfig(kind="vllm_nccl")
        self.base_urls = [u.rstrip("/") for u in base_urls]
        if not self.base_urls:
            raise ConfigError("weight_sync.kind=vllm_nccl needs at least one vLLM base_url (policy.base_urls).")
        self.sender = sender if sender is not None else NCCLSender()
        # vLLM is never in this process: always real HTTP.
        self.transport = transport or Transport(timeout_s=self.config.timeout_s, allow_local=False)
        self._initialized = False
        self.world_sizes: list[int] = []
        """Inference world size of each replica (from GET /get_world_size)."""
        self.rank_offsets: list[int] = []
        """NCCL rank of each replica's first worker in the shared group (trainer = rank 0)."""
        self.last_timings: dict[str, float] = {}
        """``perf/weight_sync_*`` seconds of the last sync."""

    async def _call(self, method: str, url: str, route: str, body: Any = None) -> Any:
        target = f"{server_root(url)}{route}"
        try:
            reply = await self.transport.request(method, target, body, timeout_s=self.config.timeout_s)
        except EndpointError as e:
            raise WeightSyncError(
                f"vLLM replica {url}: {method} {route} failed: {e}. Start the server with VLLM_SERVER_DEV_MODE=1 "
                "and --weight-transfer-config '{\"backend\": \"nccl\"}', and check it is reachable.",
                url=url, status=e.status,
            ) from e
        return reply.data

    async def _all(self, method: str, route: str, body: Any = None) -> list[Any]:
        return list(await asyncio.gather(*(self._call(method, u, route, body) for u in self.base_urls)))

    async def init(self) -> None:
        """Once: ask each replica its world size, then form one group (trainer rank 0 + every worker)."""
        sizes = await self._all("GET", "/get_world_size")
        for url, data in zip(self.base_urls, sizes):
            if not isinstance(data, dict) or not isinstance(data.get("world_size"), int) or data["world_size"] < 1:
                raise WeightSyncError(f"vLLM replica {url}: GET /get_world_size answered {data!r}; expected "
                                      '{"world_size": <int >= 1>}.', url=url)
        self.world_sizes = [d["world_size"] for d in sizes]
        self.rank_offsets = [1 + sum(self.world_sizes[:j]) for j in range(len(self.world_sizes))]
        world_size = 1 + sum(self.world_sizes)
        port = self.config.master_port or _free_port()
        # Every replica's /init_weight_transfer_engine blocks until the group forms, and so does the trainer's
        # side: run them together (vLLM's example does the same with a thread).
        inits = [
            self._call("POST", url, "/init_weight_transfer_engine", {"init_info": {
                "master_address": self.config.master_address, "master_port": port,
                "rank_offset": offset, "world_size": world_size}})
            for url, offset in zip(self.base_urls, self.rank_offsets)
        ]
        trainer = asyncio.to_thread(self.sender.init, self.config.master_address, port, world_size)
        await asyncio.gather(trainer, *inits)
        self._initialized = True

    async def sync(self, model: torch.nn.Module, version: int) -> int:
        if not self._initialized:
            await self.init()
        t0 = time.perf_counter()
        # named_parameters(), not state_dict(): tied weights appear once; vLLM re-ties them itself.
        named = [(n, p.detach()) for n, p in unwrap_model(model).named_parameters()]
        if self.config.pause_generation:
            await self._all("POST", "/pause")
        await self._all("POST", "/start_weight_update", {"is_checkpoint_format": True})
        for chunk in chunk_parameters(named, self.config.chunk_bytes):
            info = {
                "names": [n for n, _ in chunk],
                "dtype_names": [_dtype_name(t.dtype) for _, t in chunk],
                "shapes": [list(t.shape) for _, t in chunk],
                "packed": self.config.packed,
            }
            # Each replica's /update_weights returns once it received this chunk's broadcast.
            await asyncio.gather(
                self._all("POST", "/update_weights", {"update_info": info}),
                asyncio.to_thread(self.sender.send, chunk, self.config.packed),
            )
        await self._all("POST", "/finish_weight_update", {"weight_version": str(version)})
        if self.config.pause_generation:
            await self._all("POST", "/resume")
        if self.config.verify_version:
            infos = await self._all("GET", "/weight_info")
            for url, data in zip(self.base_urls, infos):
                got = data.get("weight_version") if isinstance(data, dict) else None
                if got != str(version):
                    raise WeightSyncError(
                        f"vLLM replica {url} reports weight_version={got!r} after the update, expected "
                        f"{str(version)!r}: it did not take the new weights.", url=url)
        self.last_timings = {"perf/weight_sync_s": time.perf_counter() - t0}
        return version

    async def close(self) -> None:
        await self.transport.close()


def build_weight_sync(config: WeightSyncConfig, *, server: Any = None, base_urls: Iterable[str] = (),
                      run_dir: str | os.PathLike | None = None, sender: WeightSender | None = None) -> WeightSync:
    """The ``WeightSync`` for ``config.kind``. ``server``: the embedded server object (inprocess);
    ``base_urls``: policy endpoints (checkpoint, vllm_nccl)."""
    kind = config.kind
    if kind == "inprocess":
        if server is None:
            raise ConfigError(
                "weight_sync.kind=inprocess needs the embedded policy (policy=embedded); with policy.base_urls set, "
                "use weight_sync=checkpoint (embedded server elsewhere) or weight_sync=vllm_nccl (vLLM)."
            )
        return InProcessWeightSync(server)
    if kind == "checkpoint":
        directory = config.directory or (Path(run_dir) / "weight_sync" if run_dir else None)
        if directory is None:
            raise ConfigError("weight_sync.directory is not set (and no run_dir to default to); set it to a folder "
                              "every policy replica can read.")
        return CheckpointWeightSync(base_urls, directory, keep_last=config.keep_last, timeout_s=config.timeout_s)
    if kind == "vllm_nccl":
        return VLLMWeightSync(base_urls, config, sender=sender)
    if kind == "none":
        return NoWeightSync()
    raise ConfigError(f"weight_sync.kind={kind!r} is unknown.{did_you_mean(kind, WEIGHT_SYNC_KINDS)} "
                      f"Use one of {list(WEIGHT_SYNC_KINDS)}.")


__all__ = [
    "WEIGHT_SYNC_KINDS", "WeightSyncError", "WeightSyncConfig", "WeightSync", "NoWeightSync",
    "InProcessWeightSync", "CheckpointWeightSync", "VLLMWeightSync", "WeightSender", "NCCLSender",
    "build_weight_sync", "chunk_parameters", "detached_state_dict", "server_root", "unwrap_model",
]
