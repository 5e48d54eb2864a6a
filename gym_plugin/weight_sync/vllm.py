"""Weight sync to vLLM servers: ``vllm_reload`` (safetensors on disk, any build, CPU included) and ``vllm_nccl``
(vLLM's NCCL weight transfer, GPU). Both drive every replica in ``base_urls`` and return only when all of them
serve the new version; both check at construction time (``check()``) that the routes they need exist and name
the server flag that is missing. The routes are vLLM 0.32's dev-mode routes (``VLLM_SERVER_DEV_MODE=1``), at the
server root (``base_url`` without ``/v1``).

``VLLMReloadWeightSync`` (``weight_sync=vllm_reload``), per sync:

    trainer: write <directory>/v<version>/model.safetensors (HF names, tied weights as copies), atomically
    POST /pause?mode=wait                              (only with pause_generation)
    POST /collective_rpc {"method": "gym_plugin_reload_weights", "kwargs": {"weights_path": <dir>}}
                                                       (our worker extension, gym_plugin.vllm.worker)
    POST /reset_prefix_cache -> {"success": true}      (retried while running requests hold blocks)
    POST /update_weight_version {"new_version": "<version>"}
    POST /resume                                       (only with pause_generation)
    GET  /weight_info -> {"weight_version": "<version>"}   (verify_version)

  The folder must be readable by every server (same host or shared disk). Server flags: dev mode and
  ``--worker-extension-cls gym_plugin.vllm.worker.GymPluginWorkerExtension``.

``VLLMNCCLWeightSync`` (``weight_sync=vllm_nccl``) uses vLLM's own trainer side,
``vllm.distributed.weight_transfer.nccl_engine.NCCLTrainerWeightTransferEngine`` with a ``ModuleSource`` over the
model, and gives it a client (``ReplicaFanOutClient``) that sends each control call to every replica:

    GET  /get_world_size                  -> {"world_size": n}   (once, per replica)
    POST /init_weight_transfer_engine     {"init_info": {master_address, master_port, rank_offset, world_size,
                                          packed, packed_buffer_size_bytes, packed_num_buffers}}   (once)
    POST /start_weight_update             (no body)
    POST /update_weights                  {"update_info": {names, dtype_names, shapes}}  (blocks until the
                                          broadcast of every parameter arrived)
    POST /finish_weight_update            {"weight_version": "<version>"}

  All replicas join one NCCL group: the trainer is rank 0, replica j's workers start at ``rank_offset = 1 + the
  world sizes of the replicas before it``; one broadcast reaches every replica. vLLM's trainer engine builds the
  worker init info with ``rank_offset=1``; the fan-out client rewrites it per replica. Server flags: dev mode and
  ``--weight-transfer-config '{"backend": "nccl"}'``. NCCL needs a CUDA GPU in the trainer's process: without
  one, construction fails and says to use vllm_reload.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from gym_plugin.errors import ConfigError, EndpointError, truncate
from gym_plugin.http import HTTPStatusError, Transport
from gym_plugin.net import free_port
from gym_plugin.vllm.worker import EXTENSION_QUALNAME, EXTENSION_VERSION
from gym_plugin.weight_sync.base import (
    WeightSyncConfig,
    WeightSyncError,
    check_routes,
    detached_state_dict,
    server_root,
    unwrap_model,
)

logger = logging.getLogger(__name__)

DEV_MODE_FIX = ("start the vLLM server with VLLM_SERVER_DEV_MODE=1 in its environment (the weight-update routes "
                "exist only in dev mode; `gym-plugin vllm-args --model ...` prints the whole command)")
EXTENSION_FIX = (f"start the vLLM server with --worker-extension-cls {EXTENSION_QUALNAME} (gym_plugin must be "
                 "importable by the server's Python; `gym-plugin vllm-args --model ...` prints the whole command)")
NCCL_CONFIG_FIX = ("start the vLLM server with --weight-transfer-config '{\"backend\": \"nccl\"}' (and "
                   "VLLM_SERVER_DEV_MODE=1), or use weight_sync=vllm_reload")
RELOAD_ROUTES = (("POST", "/collective_rpc"), ("POST", "/reset_prefix_cache"), ("POST", "/update_weight_version"),
                 ("GET", "/weight_info"))
NCCL_ROUTES = (("GET", "/get_world_size"), ("POST", "/init_weight_transfer_engine"),
               ("POST", "/start_weight_update"), ("POST", "/update_weights"), ("POST", "/finish_weight_update"),
               ("GET", "/weight_info"))


class _Replicas:
    """Control-plane calls to every vLLM replica; failures become WeightSyncError naming replica and route."""

    kind = "vllm"
    fix = DEV_MODE_FIX

    def __init__(self, base_urls: Iterable[str], config: WeightSyncConfig, transport: Transport | None):
        self.config = config
        self.base_urls = [u.rstrip("/") for u in base_urls]
        if not self.base_urls:
            raise ConfigError(f"weight_sync.kind={config.kind} needs at least one vLLM base_url (policy.base_urls).")
        # vLLM is never in this process: always real HTTP.
        self.transport = transport or Transport(timeout_s=config.timeout_s, allow_local=False)
        self.last_timings: dict[str, float] = {}
        """``perf/weight_sync_*`` seconds of the last sync."""
        self._verify_ids: list[int] | None = None

    async def _call(self, method: str, url: str, route: str, body: Any = None, timeout_s: float | None = None) -> Any:
        target = f"{server_root(url)}{route}"
        try:
            reply = await self.transport.request(method, target, body, timeout_s=timeout_s or self.config.timeout_s)
        except EndpointError as e:
            hint = self.fix if e.status == 404 else "the vLLM server's log says more"
            raise WeightSyncError(f"vLLM replica {url}: {method} {route} failed: {e}. {hint[0].upper()}{hint[1:]}.",
                                  url=url, status=e.status) from e
        return reply.data

    async def _all(self, method: str, route: str, body: Any = None) -> list[Any]:
        return list(await asyncio.gather(*(self._call(method, u, route, body) for u in self.base_urls)))

    async def _check_routes(self, routes) -> None:
        await asyncio.gather(*(check_routes(self.transport, u, routes, self.config.kind, self.fix)
                               for u in self.base_urls))

    async def _verify_version(self, version: int) -> None:
        infos = await self._all("GET", "/weight_info")
        for url, data in zip(self.base_urls, infos):
            got = data.get("weight_version") if isinstance(data, dict) else None
            if got != str(version):
                raise WeightSyncError(f"vLLM replica {url} reports weight_version={got!r} after the update, expected "
                                      f"{str(version)!r}: it did not take the new weights.", url=url)

    async def _verify_logprobs(self, model: torch.nn.Module, version: int) -> float:
        """Max |replica log-prob - trainer log-prob| over 32 fixed ids (the first synced model's greedy path) and every
        replica; raises over the tolerance."""
        tol = self.config.verify_logprobs_tol
        inner = unwrap_model(model)
        if not hasattr(inner, "config") or not callable(getattr(inner, "forward", None)):
            raise WeightSyncError("weight_sync.verify_logprobs_tol needs a Hugging Face causal LM (with .config); "
                                  f"got {type(inner).__name__}.")
        if self._verify_ids is None:  # fixed for the whole run: the first synced model's greedy path
            self._verify_ids = await asyncio.to_thread(greedy_token_ids, inner)
        ids = self._verify_ids
        ours = await asyncio.to_thread(teacher_forced_logprobs, inner, ids)
        worst = 0.0
        for url in self.base_urls:
            data = await self._call("POST", url, "/v1/completions", {
                "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0})
            try:
                entries = data["choices"][0]["prompt_logprobs"][1:]
                theirs = [entry[str(t)]["logprob"] for entry, t in zip(entries, ids[1:])]
            except (KeyError, IndexError, TypeError) as e:
                raise WeightSyncError(f"vLLM replica {url}: /v1/completions answered no prompt_logprobs for the "
                                      f"verification ids ({type(e).__name__}: {e}): {truncate(data, 200)}",
                                      url=url) from e
            diff = max(abs(a - b) for a, b in zip(ours, theirs))
            logger.info("vLLM replica %s serves version %s: max |log-prob - trainer's| = %.2e over %d fixed ids",
                        url, version, diff, len(ids) - 1)
            if diff > tol:
                raise WeightSyncError(
                    f"vLLM replica {url} took version {version} but its teacher-forced log-probs differ from the "
                    f"trainer's by up to {diff:.3g} (> weight_sync.verify_logprobs_tol={tol:g}) on fixed ids: it "
                    "serves other weights than the trainer's (partly applied update? a CPU build without the "
                    "worker extension's tied-LM-head re-pack? a lower-precision dtype than the trainer's?).", url=url)
            worst = max(worst, diff)
        return worst

    async def close(self) -> None:
        await self.transport.close()


def fixed_token_ids(vocab_size: int, n: int = 32) -> list[int]:
    """``n`` token ids spread over the vocabulary, the same every time (a prime stride). Their log-probs are far
    in the tail (about -16 for SmolLM2), where float32 kernels of different libraries differ by up to ~1e-3."""
    return [1 + (7919 * i) % (vocab_size - 1) for i in range(n)]


def greedy_token_ids(model: torch.nn.Module, n: int = 32) -> list[int]:
    """The model's own greedy continuation of its bos token, ``n`` ids: tokens a sampler actually visits, whose
    log-probs float32 kernels agree on to ~1e-4 (tail tokens differ more, see ``fixed_token_ids``)."""
    start = getattr(model.config, "bos_token_id", None)
    ids = [int(start if isinstance(start, int) else 0)]
    device = next(model.parameters()).device
    with torch.no_grad():
        for _ in range(n - 1):
            logits = model(torch.tensor([ids], device=device)).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return ids


def teacher_forced_logprobs(model: torch.nn.Module, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1 under ``model`` (a HF causal LM), in float32."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device)).logits[0].float()  # [T, V]
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[i - 1, t]) for i, t in enumerate(ids) if i > 0]


# ---- vllm_reload ---------------------------------------------------------------------------------------------
class VLLMReloadWeightSync(_Replicas):
    """``weight_sync=vllm_reload``: see the module docstring. ``directory``: where the weight folders are written
    (readable by every server); ``config.keep_last`` folders are kept."""

    fix = DEV_MODE_FIX

    def __init__(self, base_urls: Iterable[str], directory: str | os.PathLike, config: WeightSyncConfig | None = None,
                 *, transport: Transport | None = None):
        super().__init__(base_urls, config or WeightSyncConfig(kind="vllm_reload"), transport)
        self.directory = Path(directory).resolve()
        self._written: list[Path] = []

    async def check(self) -> None:
        """The dev-mode routes exist on every replica and our worker extension is loaded (same version)."""
        await self._check_routes(RELOAD_ROUTES)

        async def one(url: str) -> None:
            try:
                reply = await self.transport.post(f"{server_root(url)}/collective_rpc",
                                                  {"method": "gym_plugin_extension_info"}, timeout_s=60.0)
            except HTTPStatusError as e:
                raise WeightSyncError(
                    f"vLLM replica {url} cannot run gym_plugin's worker extension (POST /collective_rpc "
                    f"gym_plugin_extension_info answered HTTP {e.status}: {truncate(e.body, 200)}): {EXTENSION_FIX}.",
                    url=url, status=e.status) from e
            except EndpointError as e:
                raise WeightSyncError(f"vLLM replica {url}: POST /collective_rpc failed: {e}", url=url) from e
            results = reply.data.get("results") if isinstance(reply.data, dict) else None
            versions = {r.get("version") for r in results or [] if isinstance(r, dict)}
            if not results or versions != {EXTENSION_VERSION}:
                raise WeightSyncError(
                    f"vLLM replica {url} runs gym_plugin worker extension version(s) {sorted(versions, key=str)} "
                    f"({truncate(reply.data, 200)}); this trainer speaks version {EXTENSION_VERSION}: restart the "
                    "server with the trainer's gym_plugin on its path.", url=url)

        await asyncio.gather(*(one(u) for u in self.base_urls))

    def write(self, model: torch.nn.Module, version: int) -> Path:
        """``<directory>/v{version:06d}/model.safetensors`` (written under a temporary name, then renamed)."""
        from safetensors.torch import save_file

        folder = self.directory / f"v{version:06d}"
        tmp = self.directory / f".v{version:06d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(detached_state_dict(model), str(tmp / "model.safetensors"), metadata={"policy_version": str(version)})
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return folder

    async def sync(self, model: torch.nn.Module, version: int) -> int:
        t0 = time.perf_counter()
        folder = await asyncio.to_thread(self.write, model, version)
        t_write = time.perf_counter() - t0
        if self.config.pause_generation:
            await self._all("POST", "/pause?mode=wait")
        try:
            await asyncio.gather(*(self._reload(url, folder) for url in self.base_urls))
            await asyncio.gather(*(self._reset_prefix_cache(url) for url in self.base_urls))
            await self._all("POST", "/update_weight_version", {"new_version": str(version)})
        finally:
            if self.config.pause_generation:
                await self._all("POST", "/resume")
        if self.config.verify_version:
            await self._verify_version(version)
        diff = await self._verify_logprobs(model, version) if self.config.verify_logprobs_tol is not None else None
        self._written.append(folder)
        while len(self._written) > max(1, self.config.keep_last):
            shutil.rmtree(self._written.pop(0), ignore_errors=True)
        self.last_timings = {"perf/weight_sync_s": time.perf_counter() - t0, "perf/weight_sync_write_s": t_write}
        if diff is not None:
            self.last_timings["policy/weight_sync_max_logprob_diff"] = diff
        return version

    async def _reload(self, url: str, folder: Path) -> None:
        data = await self._call("POST", url, "/collective_rpc", {
            "method": "gym_plugin_reload_weights", "kwargs": {"weights_path": str(folder)},
            "timeout": self.config.timeout_s})
        results = data.get("results") if isinstance(data, dict) else None
        if not results or not all(isinstance(r, dict) and r.get("weights_path") == str(folder) for r in results):
            raise WeightSyncError(f"vLLM replica {url}: reloading {folder} answered {truncate(data, 300)}; expected "
                                  "one result per worker naming that folder.", url=url)

    async def _reset_prefix_cache(self, url: str, attempts: int = 20, delay_s: float = 0.25) -> None:
        """Cached prefixes were computed with the old weights. vLLM refuses the reset while running requests hold
        blocks: retried, then an error that says how to avoid it."""
        for _ in range(attempts):
            data = await self._call("POST", url, "/reset_prefix_cache")
            if isinstance(data, dict) and data.get("success"):
                return
            await asyncio.sleep(delay_s)
        raise WeightSyncError(
            f"vLLM replica {url} kept refusing /reset_prefix_cache ({attempts} tries over {attempts * delay_s:g} s: "
            "requests were running); its cache still holds prefixes of the old weights. Set "
            "weight_sync.pause_generation=true when syncing while rollouts are generated.", url=url)


# ---- vllm_nccl -------------------------------------------------------------------------------------------------
def _vllm_nccl_api():
    """vLLM's trainer-side NCCL classes (vLLM >= 0.32), or a ConfigError that says what to install."""
    try:
        from vllm.distributed.weight_transfer.base import ModuleSource
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )
    except ImportError as e:
        raise ConfigError(
            "weight_sync.kind=vllm_nccl needs vLLM >= 0.32 (vllm.distributed.weight_transfer.nccl_engine."
            f"NCCLTrainerWeightTransferEngine) in the trainer's environment ({type(e).__name__}: {e}). Install it "
            "with `pip install 'gym_plugin[vllm-gpu]'` (or `pip install vllm==0.32.0`) on the GPU machine, or use "
            "weight_sync=vllm_reload."
        ) from None
    return NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine, ModuleSource


class ReplicaFanOutClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol (four blocking methods, called from vLLM's trainer engine threads)
    over every replica: each call is posted to all of them on ``loop`` and waits for all. The worker init info is
    rewritten per replica (``rank_offset``), and ``finish_weight_update`` sends ``version`` (set before each
    send)."""

    def __init__(self, replicas: _Replicas, loop: asyncio.AbstractEventLoop, rank_offsets: list[int]):
        self.replicas = replicas
        self.loop = loop
        self.rank_offsets = rank_offsets
        self.version: str | None = None

    def _run(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def init_bodies(self, init_info: dict[str, Any]) -> list[dict]:
        """``/init_weight_transfer_engine`` body of each replica."""
        return [{"init_info": {**init_info, "rank_offset": offset}} for offset in self.rank_offsets]

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        r = self.replicas

        async def all_replicas():  # gather is built on the loop, not in this (vLLM's) thread
            return await asyncio.gather(*(r._call("POST", u, "/init_weight_transfer_engine", body)
                                          for u, body in zip(r.base_urls, self.init_bodies(init_info))))

        self._run(all_replicas())

    def start_weight_update(self) -> None:
        self._run(self.replicas._all("POST", "/start_weight_update"))

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self._run(self.replicas._all("POST", "/update_weights", {"update_info": update_info}))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = weight_version if weight_version is not None else self.version
        self._run(self.replicas._all("POST", "/finish_weight_update",
                                     {"weight_version": version} if version is not None else None))


class VLLMNCCLWeightSync(_Replicas):
    """``weight_sync=vllm_nccl``: see the module docstring. Fails at construction without vLLM or a CUDA GPU."""

    fix = NCCL_CONFIG_FIX

    def __init__(self, base_urls: Iterable[str], config: WeightSyncConfig | None = None, *,
                 transport: Transport | None = None):
        config = config or WeightSyncConfig(kind="vllm_nccl")
        self._init_info_cls, self._engine_cls, self._source_cls = _vllm_nccl_api()
        if not torch.cuda.is_available():
            raise ConfigError(
                "weight_sync=vllm_nccl broadcasts the weights with NCCL from a CUDA GPU of the trainer's process, and "
                "this machine has none (torch.cuda.is_available() is False). Use weight_sync=vllm_reload (weights "
                "through a folder the vLLM servers can read; works on CPU and GPU), or run the trainer on a GPU."
            )
        super().__init__(base_urls, config, transport)
        self.world_sizes: list[int] = []
        """Inference world size of each replica (GET /get_world_size)."""
        self.rank_offsets: list[int] = []
        """NCCL rank of each replica's first worker in the shared group (trainer = rank 0)."""
        self.client: ReplicaFanOutClient | None = None
        self.engine = None

    async def check(self) -> None:
        await check_nccl_replicas(self.transport, self.base_urls)

    async def _init(self, model: torch.nn.Module) -> None:
        sizes = await self._all("GET", "/get_world_size")
        for url, data in zip(self.base_urls, sizes):
            if not isinstance(data, dict) or not isinstance(data.get("world_size"), int) or data["world_size"] < 1:
                raise WeightSyncError(f"vLLM replica {url}: GET /get_world_size answered {data!r}; expected "
                                      '{"world_size": <int >= 1>}.', url=url)
        self.world_sizes = [d["world_size"] for d in sizes]
        self.rank_offsets = [1 + sum(self.world_sizes[:j]) for j in range(len(self.world_sizes))]
        self.client = ReplicaFanOutClient(self, asyncio.get_running_loop(), self.rank_offsets)
        init_info = self._init_info_cls(
            master_address=self.config.master_address,
            master_port=self.config.master_port or free_port(self.config.master_address),
            world_size=1 + sum(self.world_sizes), packed=self.config.packed,
            packed_buffer_size_bytes=self.config.chunk_bytes, rank=0)
        # trainer_init posts /init_weight_transfer_engine (a thread of its own) while it joins the group as rank 0
        self.engine = await asyncio.to_thread(self._engine_cls.trainer_init, init_info, client=self.client,
                                              source=self._source_cls(unwrap_model(model)))

    async def sync(self, model: torch.nn.Module, version: int) -> int:
        if self.engine is None:
            await self._init(model)
        t0 = time.perf_counter()
        if self.config.pause_generation:
            await self._all("POST", "/pause?mode=wait")
        try:
            self.client.version = str(version)
            # start -> update_weights (concurrent with the broadcast) -> finish, all replicas at each step
            await asyncio.to_thread(self.engine.send_weights)
        finally:
            if self.config.pause_generation:
                await self._all("POST", "/resume")
        if self.config.verify_version:
            await self._verify_version(version)
        self.last_timings = {"perf/weight_sync_s": time.perf_counter() - t0}
        if self.config.verify_logprobs_tol is not None:
            self.last_timings["policy/weight_sync_max_logprob_diff"] = await self._verify_logprobs(model, version)
        return version

    async def close(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
        await super().close()


async def check_nccl_replicas(transport: Transport, base_urls: list[str]) -> None:
    """vllm_nccl's construction-time check: the dev-mode routes exist and the server was started with a weight
    transfer config (read from GET /server_info, a dev-mode route; skipped with a warning if it does not answer)."""
    async def one(url: str) -> None:
        await check_routes(transport, url, NCCL_ROUTES, "vllm_nccl", DEV_MODE_FIX)
        try:
            reply = await transport.get(f"{server_root(url)}/server_info?config_format=json", timeout_s=120.0)
        except EndpointError as e:
            logger.warning("vLLM replica %s: GET /server_info failed (%s); cannot check --weight-transfer-config", url, e)
            return
        cfg = reply.data.get("vllm_config") if isinstance(reply.data, dict) else None
        if isinstance(cfg, dict) and not cfg.get("weight_transfer_config"):
            raise WeightSyncError(f"vLLM replica {url} was started without a weight transfer config "
                                  f"(/server_info: weight_transfer_config is empty): {NCCL_CONFIG_FIX}.", url=url)

    await asyncio.gather(*(one(u) for u in base_urls))

