"""A fake vLLM weight-transfer control plane (a gym_plugin Server on 127.0.0.1) that records every call.

It answers the routes of vLLM's dev-mode RLHF router (``VLLM_SERVER_DEV_MODE=1``; see gym_plugin/weight_sync.py
for the list and the bodies) and enforces the order vLLM needs: ``/init_weight_transfer_engine`` once before
anything else, ``/update_weights`` only between ``/start_weight_update`` and ``/finish_weight_update``. A call
out of order answers HTTP 400 like a real server would fail. ``fail_routes`` makes a route answer an error
status, to test that the trainer names the failing replica.

It also answers ``POST /update_weights_from_path`` (the embedded server's checkpoint route): it reads the
safetensors file, records its tensor names, and reports the version, so ``CheckpointWeightSync`` can be
tested without a model.

There is no data plane: tests pair it with a recording ``WeightSender`` (``RecordingSender``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from gym_plugin.servers.base import HandlerError, RequestContext, Server


@dataclasses.dataclass
class ControlCall:
    """One recorded request."""

    route: str
    """Path of the route, e.g. '/update_weights'."""
    body: Any
    """The parsed JSON body (None for GET)."""


class FakeVLLMControlServer(Server):
    """Records calls in ``calls``; state in ``initialized``, ``updating``, ``weight_version``."""

    server_type = ""

    def __init__(self, name: str = "fake_vllm", *, world_size: int = 1,
                 fail_routes: dict[str, int] | None = None, host: str = "127.0.0.1", port: int = 0):
        self.world_size = world_size
        """What GET /get_world_size reports (inference workers of this replica)."""
        self.fail_routes = dict(fail_routes or {})
        """route -> HTTP status to answer instead of handling it."""
        self.calls: list[ControlCall] = []
        self.initialized = False
        self.updating = False
        self.paused = False
        self.weight_version: str | None = None
        self.received_names: list[str] = []
        """Parameter names announced by /update_weights since the last /start_weight_update."""
        self.loaded_paths: list[str] = []
        self.stale_loads = False
        """When True, /update_weights_from_path reads the file but keeps reporting the old version."""
        super().__init__(name, host=host, port=port)

    def routes(self):
        return [
            ("GET", "/get_world_size", self.get_world_size),
            ("POST", "/init_weight_transfer_engine", self.init_engine),
            ("POST", "/pause", self.pause),
            ("POST", "/resume", self.resume),
            ("POST", "/start_weight_update", self.start_update),
            ("POST", "/update_weights", self.update_weights),
            ("POST", "/finish_weight_update", self.finish_update),
            ("GET", "/weight_info", self.weight_info),
            ("POST", "/update_weights_from_path", self.update_weights_from_path),
        ]

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

    async def init_engine(self, body: Any, ctx: RequestContext) -> dict:
        self._record("/init_weight_transfer_engine", body)
        info = body.get("init_info") if isinstance(body, dict) else None
        if info is None:
            raise HandlerError(400, "Missing 'init_info' in request body")
        missing = [k for k in ("master_address", "master_port", "rank_offset", "world_size") if k not in info]
        if missing:
            raise HandlerError(400, f"init_info lacks {missing}")
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
            raise HandlerError(400, "start_weight_update before init_weight_transfer_engine")
        self.updating = True
        self.received_names = []
        return {"message": "Weight update started"}

    async def update_weights(self, body: Any, ctx: RequestContext) -> dict:
        self._record("/update_weights", body)
        info = body.get("update_info") if isinstance(body, dict) else None
        if info is None:
            raise HandlerError(400, "Missing 'update_info' in request body")
        if not self.updating:
            raise HandlerError(400, "update_weights outside start_weight_update/finish_weight_update")
        names, dtypes, shapes = info.get("names"), info.get("dtype_names"), info.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)) or not (
            len(names) == len(dtypes) == len(shapes)
        ):
            raise HandlerError(400, "update_info needs names, dtype_names and shapes lists of equal length")
        for d in dtypes:
            if not isinstance(getattr(torch, d, None), torch.dtype):
                raise HandlerError(400, f"unknown dtype name {d!r}")
        self.received_names.extend(names)
        return {"message": "Weights updated"}

    async def finish_update(self, body: Any, ctx: RequestContext) -> dict:
        self._record("/finish_weight_update", body)
        if not self.updating:
            raise HandlerError(400, "finish_weight_update without start_weight_update")
        self.updating = False
        version = body.get("weight_version") if isinstance(body, dict) else None
        if version is not None:
            self.weight_version = str(version)
        return {"message": "Weight update finished"}

    async def weight_info(self, body: Any, ctx: RequestContext) -> dict:
        self._record("/weight_info", body)
        return {"weight_version": self.weight_version}

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
        version = int(self.weight_version or 0) + (0 if self.stale_loads else 1)
        self.weight_version = str(version)
        return {"policy_version": version}


class RecordingSender:
    """A ``WeightSender`` that moves nothing and records what it was asked to send (tests)."""

    def __init__(self) -> None:
        self.init_args: tuple[str, int, int] | None = None
        self.sent: list[list[str]] = []
        """Names of each ``send`` call, in order."""

    def init(self, master_address: str, master_port: int, world_size: int) -> None:
        self.init_args = (master_address, master_port, world_size)

    def send(self, named_tensors: list[tuple[str, torch.Tensor]], packed: bool) -> None:
        self.sent.append([n for n, _ in named_tensors])
