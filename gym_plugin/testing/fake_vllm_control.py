"""A fake vLLM 0.32 weight-update control plane (a gym_plugin Server on 127.0.0.1) that records every call.

It answers the dev-mode routes (``VLLM_SERVER_DEV_MODE=1``) gym_plugin's weight syncs use, with vLLM 0.32's
shapes (read from the installed vLLM: ``entrypoints/rl/online/api_router.py``, ``entrypoints/serve/dev/*``,
``distributed/weight_transfer/nccl_common.py`` and ``nccl_engine.py``), and refuses what vLLM refuses:

- ``/init_weight_transfer_engine`` ``{"init_info": {...}}``: keys of ``NCCLWeightTransferInitInfo`` only
  (``master_address, master_port, rank_offset, world_size, nccl_unique_id_b64, packed,
  packed_buffer_size_bytes, packed_num_buffers``); an unknown key answers 500 with vLLM's
  ``unexpected keyword argument`` message; needs a weight transfer config (``weight_transfer``);
- ``/update_weights`` ``{"update_info": {"names", "dtype_names", "shapes"}}`` (exactly these, equal lengths),
  only between ``/start_weight_update`` and ``/finish_weight_update``;
- ``/collective_rpc`` runs ``gym_plugin_extension_info`` / ``gym_plugin_reload_weights`` only when our worker
  extension is "loaded" (``extension``); the reload reads the folder's safetensors names;
- ``/reset_prefix_cache`` answers ``{"success": false}`` ``busy_resets`` times first (running requests);
- ``/weight_info`` reports ``"default"`` until a version is set, like vLLM.

``dev_mode=False`` serves none of these (a server started without VLLM_SERVER_DEV_MODE=1), which is how the
weight syncs' construction-time route checks are tested. ``POST /update_weights_from_path`` (the embedded
server's checkpoint route) is served when ``embedded=True``: it reads the safetensors file, records its tensor
names and reports the version. There is no data plane (no NCCL on CPU).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from gym_plugin.servers.base import HandlerError, RequestContext, Server
from gym_plugin.vllm.worker import EXTENSION_QUALNAME, EXTENSION_VERSION

INIT_INFO_KEYS = ("master_address", "master_port", "rank_offset", "world_size", "nccl_unique_id_b64", "packed",
                  "packed_buffer_size_bytes", "packed_num_buffers")
UPDATE_INFO_KEYS = ("names", "dtype_names", "shapes")


@dataclasses.dataclass
class ControlCall:
    """One recorded request."""

    route: str
    """Path of the route, e.g. '/update_weights'."""
    body: Any
    """The parsed JSON body (None for GET)."""


def _unexpected(cls: str, body: dict, allowed) -> None:
    extra = [k for k in body if k not in allowed]
    if extra:  # what vLLM's dataclass parser answers (HTTP 500)
        raise HandlerError(500, f"{cls}.__init__() got an unexpected keyword argument {extra[0]!r}", "server_error")


class FakeVLLMControlServer(Server):
    """Records calls in ``calls``; state in ``initialized``, ``updating``, ``weight_version``."""

    server_type = ""

    def __init__(self, name: str = "fake_vllm", *, world_size: int = 1, fail_routes: dict[str, int] | None = None,
                 dev_mode: bool = True, extension: bool = True, weight_transfer: bool = True,
                 embedded: bool = True, busy_resets: int = 0, host: str = "127.0.0.1", port: int = 0):
        self.world_size = world_size
        """What GET /get_world_size reports (inference workers of this replica)."""
        self.fail_routes = dict(fail_routes or {})
        """route -> HTTP status to answer instead of handling it."""
        self.dev_mode, self.extension, self.weight_transfer, self.embedded = dev_mode, extension, weight_transfer, embedded
        self.busy_resets = busy_resets
        """How many /reset_prefix_cache calls answer success=false before one succeeds."""
        self.calls: list[ControlCall] = []
        self.initialized = False
        self.updating = False
        self.paused = False
        self.weight_version: str | None = None
        self.received_names: list[str] = []
        """Parameter names announced by /update_weights since the last /start_weight_update, or read by a reload."""
        self.loaded_paths: list[str] = []
        self.stale_loads = False
        """When True, /update_weights_from_path reads the file but keeps reporting the old version."""
        super().__init__(name, host=host, port=port)

    def routes(self):
        dev = [
            ("GET", "/get_world_size", self.get_world_size),
            ("POST", "/init_weight_transfer_engine", self.init_engine),
            ("POST", "/pause", self.pause),
            ("POST", "/resume", self.resume),
            ("POST", "/start_weight_update", self.start_update),
            ("POST", "/update_weights", self.update_weights),
            ("POST", "/finish_weight_update", self.finish_update),
            ("GET", "/weight_info", self.weight_info),
            ("POST", "/update_weight_version", self.update_weight_version),
            ("POST", "/reset_prefix_cache", self.reset_prefix_cache),
            ("POST", "/collective_rpc", self.collective_rpc),
            ("GET", "/server_info", self.server_info),
        ]
        embedded = [("POST", "/update_weights_from_path", self.update_weights_from_path)]
        return (dev if self.dev_mode else []) + (embedded if self.embedded else [])

    def _record(self, route: str, body: Any) -> None:
        self.calls.append(ControlCall(route, body))
        if route in self.fail_routes:
            raise HandlerError(self.fail_routes[route], f"injected failure on {route}", "server_error")

    @property
    def routes_called(self) -> list[str]:
        return [c.route for c in self.calls]

    async def get_world_size(self, body: Any, ctx: RequestContext) -> dict:
        self._record("/get_world_size", body)
        return {"world_size": self.world_size}

    async def server_info(self, body: Any, ctx: RequestContext) -> dict:
        self._record("/server_info", body)
        return {"vllm_config": {"weight_transfer_config": {"backend": "nccl"} if self.weight_transfer else None,
                                "parallel_config": {"worker_extension_cls": EXTENSION_QUALNAME if self.extension
                                                    else ""}}}

    async def init_engine(self, body: Any, ctx: RequestContext) -> dict:
        self._record("/init_weight_transfer_engine", body)
        info = body.get("init_info") if isinstance(body, dict) else None
        if not isinstance(info, dict):
            raise HandlerError(422, "Field required: init_info")
        if not self.weight_transfer:
            raise HandlerError(500, "Weight transfer not configured. Please set --weight-transfer-config",
                               "server_error")
        _unexpected("NCCLWeightTransferInitInfo", info, INIT_INFO_KEYS)
        missing = [k for k in ("rank_offset", "world_size") if k not in info]
        if missing or not (("master_address" in info and "master_port" in info) or info.get("nccl_unique_id_b64")):
            raise HandlerError(500, f"NCCLWeightTransferInitInfo: missing {missing or 'the rendezvous'}",
                               "server_error")
        self.initialized = True
        return {"message": "Weight transfer initialized"}

    async def pause(self, body: Any, ctx: RequestContext) -> dict:
        self._record("/pause", body)
        self.paused = True
        return {"status": "paused"}

    async def resume(self, body: Any, ctx: RequestContext) -> dict:
        self._record("/resume", body)
        self.paused = False
        return {"status": "resumed"}

    async def start_update(self, body: Any, ctx: RequestContext) -> dict:
        self._record("/start_weight_update", body)
        if not self.initialized:
            raise HandlerError(500, "start_weight_update before init_weight_transfer_engine", "server_error")
        self.updating = True
        self.received_names = []
        return {"message": "Weight update started"}

    async def update_weights(self, body: Any, ctx: RequestContext) -> dict:
        self._record("/update_weights", body)
        info = body.get("update_info") if isinstance(body, dict) else None
        if not isinstance(info, dict):
            raise HandlerError(422, "Field required: update_info")
        if not self.updating:
            raise HandlerError(500, "update_weights outside start_weight_update/finish_weight_update", "server_error")
        _unexpected("NCCLWeightTransferUpdateInfo", info, UPDATE_INFO_KEYS)
        names, dtypes, shapes = info.get("names"), info.get("dtype_names"), info.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)) or not (
            len(names) == len(dtypes) == len(shapes)
        ):
            raise HandlerError(500, "update_info needs names, dtype_names and shapes lists of equal length",
                               "server_error")
        for d in dtypes:
            if not isinstance(getattr(torch, d, None), torch.dtype):
                raise HandlerError(500, f"unknown dtype name {d!r}", "server_error")
        self.received_names.extend(names)
        return {"message": "Weights updated"}

    async def finish_update(self, body: Any, ctx: RequestContext) -> dict:
        self._record("/finish_weight_update", body)
        if not self.updating:
            raise HandlerError(500, "finish_weight_update without start_weight_update", "server_error")
        self.updating = False
        version = body.get("weight_version") if isinstance(body, dict) else None
        if version is not None:
            self.weight_version = str(version)
        return {"message": "Weight update finished"}

    async def weight_info(self, body: Any, ctx: RequestContext) -> dict:
        self._record("/weight_info", body)
        return {"weight_version": self.weight_version if self.weight_version is not None else "default"}

    async def update_weight_version(self, body: Any, ctx: RequestContext) -> dict:
        self._record("/update_weight_version", body)
        version = body.get("new_version") if isinstance(body, dict) else None
        if not isinstance(version, str):
            raise HandlerError(422, "Field required: new_version (a string)")
        self.weight_version = version
        return {"success": True, "new_version": version}

    async def reset_prefix_cache(self, body: Any, ctx: RequestContext) -> dict:
        self._record("/reset_prefix_cache", body)
        if self.busy_resets > 0:
            self.busy_resets -= 1
            return {"success": False}
        return {"success": True}

    async def collective_rpc(self, body: Any, ctx: RequestContext) -> dict:
        self._record("/collective_rpc", body)
        method = body.get("method") if isinstance(body, dict) else None
        if method is None:
            raise HandlerError(400, "Missing 'method' in request body")
        if not self.extension or not str(method).startswith("gym_plugin_"):
            raise HandlerError(500, f"Call to collective_rpc method failed: Worker failed with error ''CPUWorker' "
                                    f"object has no attribute '{method}''", "server_error")
        if method == "gym_plugin_extension_info":
            return {"results": [{"extension": EXTENSION_QUALNAME, "version": EXTENSION_VERSION}] * self.world_size}
        if method == "gym_plugin_reload_weights":
            from safetensors import safe_open

            folder = (body.get("kwargs") or {}).get("weights_path")
            files = sorted(Path(str(folder)).glob("*.safetensors")) if folder else []
            if not files:
                raise HandlerError(500, f"no safetensors files in {folder!r}", "server_error")
            with safe_open(str(files[0]), framework="pt") as f:
                self.received_names = list(f.keys())
            self.loaded_paths.append(str(folder))
            return {"results": [{"weights_path": str(folder), "repacked_lm_heads": ["lm_head"], "seconds": 0.0}]
                    * self.world_size}
        raise HandlerError(500, f"Worker failed with error 'no attribute {method}'", "server_error")

    async def update_weights_from_path(self, body: Any, ctx: RequestContext) -> dict:
        self._record("/update_weights_from_path", body)
        from safetensors import safe_open

        path = body.get("path") if isinstance(body, dict) else None
        if not isinstance(path, str):
            raise HandlerError(400, 'body needs {"path": "<safetensors file>"}')
        try:
            with safe_open(path, framework="pt") as f:
                self.received_names = list(f.keys())
        except Exception as e:
            raise HandlerError(400, f"cannot read {path}: {type(e).__name__}: {e}") from e
        self.loaded_paths.append(path)
        # like the embedded server: its own counter, +1 per load (the trainer's number is not echoed)
        current = int(self.weight_version) if (self.weight_version or "").isdigit() else 0
        version = current + (0 if self.stale_loads else 1)
        self.weight_version = str(version)
        return {"policy_version": version}
