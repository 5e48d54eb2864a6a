"""The weight-sync interface (``WeightSync``), its config, the route check and the kinds that need no peer:
``none``, ``inprocess`` (the embedded policy in this process), ``checkpoint`` (an embedded server elsewhere).
The package docstring (`gym_plugin.weight_sync`) describes every kind."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch

from gym_plugin.errors import ConfigError, EndpointError
from gym_plugin.http import HTTPStatusError, Transport

logger = logging.getLogger(__name__)

WEIGHT_SYNC_KINDS = ("inprocess", "checkpoint", "vllm_reload", "vllm_nccl", "none")


class WeightSyncError(EndpointError):
    """A policy replica did not take the new weights (HTTP error, wrong version). ``url`` names the replica."""


@dataclasses.dataclass
class WeightSyncConfig:
    """The ``weight_sync`` config group (conf/weight_sync/*.yaml)."""

    kind: str = "inprocess"
    """'inprocess' (embedded policy in this process) | 'checkpoint' (embedded server elsewhere: safetensors +
    POST /update_weights_from_path) | 'vllm_reload' (vLLM: safetensors folder + our worker extension, CPU or
    GPU) | 'vllm_nccl' (vLLM's NCCL weight transfer, GPU) | 'none' (never sync; evaluation or a frozen
    policy)."""
    directory: str | None = None
    """checkpoint, vllm_reload: where the weights are written (must be readable by every replica); default
    ``<run_dir>/weight_sync``."""
    keep_last: int = 1
    """checkpoint, vllm_reload: how many weight files/folders to keep on disk (older ones are deleted once every
    replica moved on)."""
    master_address: str = "127.0.0.1"
    """vllm_nccl: address of this trainer, reachable from every vLLM worker (NCCL rendezvous)."""
    master_port: int = 0
    """vllm_nccl: rendezvous port (0 = pick a free one)."""
    chunk_bytes: int = 512 * 1024 * 1024
    """vllm_nccl: size of each of vLLM's packed broadcast buffers (``packed_buffer_size_bytes``; the trainer
    sends it to the workers at init), bounding the memory a sync needs on both sides."""
    packed: bool = True
    """vllm_nccl: vLLM's packed broadcast (batches small tensors into those buffers)."""
    pause_generation: bool = False
    """vllm_reload, vllm_nccl: POST /pause?mode=wait before and /resume after the update (needed when collection
    overlaps syncing: in-flight requests finish first, and the prefix cache can be reset)."""
    verify_version: bool = True
    """vllm_reload, vllm_nccl: after the update, GET /weight_info on every replica and check it reports the new
    version."""
    timeout_s: float = 600.0
    """Timeout of one control-plane request (update_weights waits for the broadcast), seconds."""
    verify_logprobs_tol: float | None = None
    """vllm_reload, vllm_nccl: after each sync, ask every replica for teacher-forced log-probs of 32 fixed token
    ids (the first synced model's greedy continuation of bos; /v1/completions with prompt_logprobs) and raise
    when one differs from the trainer's own by more than this (e.g. 1e-3 for float32 on both sides; None: no
    check). Catches a replica that serves other weights than the trainer's (a half-applied update, a stale tied
    LM head)."""


def server_root(base_url: str) -> str:
    """'http://h:8000/v1' -> 'http://h:8000': vLLM and the embedded server serve control routes at the root."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


CHECKPOINT_ROUTES = (("POST", "/update_weights_from_path"),)
CHECKPOINT_FIX = ("weight_sync=checkpoint talks to gym_plugin's embedded policy server (gym-plugin embedded); for "
                  "a vLLM server use weight_sync=vllm_reload (or vllm_nccl on GPUs)")


async def check_routes(transport: Transport, base_url: str, routes, kind: str, fix: str) -> None:
    """Raise WeightSyncError unless every ``(method, path)`` of ``routes`` exists on the server of ``base_url``.

    Probed without side effects: a GET route is called; a POST route is asked with GET, which a server that has
    the route answers 405 (method not allowed) and one that lacks it 404. The error lists every missing route,
    the weight sync that needs them and ``fix`` (the server flag to add).
    """
    root = server_root(base_url)
    missing = []
    for method, path in routes:
        try:
            await transport.request("GET", f"{root}{path}", timeout_s=30.0)
        except HTTPStatusError as e:
            if e.status == 404:
                missing.append(f"{method} {path}")
            # any other status (405 for a POST route, 500, 401) means the route is there
        except EndpointError as e:
            raise WeightSyncError(f"policy replica {base_url} did not answer the weight_sync={kind} route check "
                                  f"(GET {root}{path}): {e}", url=base_url) from e
    if missing:
        raise WeightSyncError(f"policy replica {base_url} has no {', '.join(missing)}, which weight_sync={kind} "
                              f"needs: {fix}.", url=base_url, status=404)


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

    async def check(self) -> None:
        """Before training: raise WeightSyncError naming the replica, the missing route and the server flag to
        add, if a replica cannot take updates this way."""
        ...

    async def sync(self, model: torch.nn.Module, version: int) -> int:
        """Push ``model``'s weights to every replica as policy ``version``; returns the version they report."""
        ...

    async def close(self) -> None:
        """Release connections / process groups."""
        ...


class NoWeightSync:
    """``kind: none``: the policy keeps its weights (evaluation, or a frozen sampler)."""

    async def check(self) -> None:
        return None

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

    async def check(self) -> None:
        return None  # the server object was checked at construction

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

    async def check(self) -> None:
        """Every replica serves POST /update_weights_from_path (a gym_plugin embedded policy server)."""
        await asyncio.gather(*(check_routes(self.transport, u, CHECKPOINT_ROUTES, "checkpoint", CHECKPOINT_FIX)
                               for u in self.base_urls))

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
