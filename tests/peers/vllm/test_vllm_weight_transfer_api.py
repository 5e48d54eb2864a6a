"""weight_sync=vllm_nccl against vLLM 0.32's own code, as far as a machine without a GPU allows.

Two "replicas" (world sizes 1 and 2) are vLLM's real RL HTTP router (``vllm.entrypoints.rl.online.api_router``,
the routes ``VLLM_SERVER_DEV_MODE=1`` serves) in a FastAPI app on 127.0.0.1, whose engine client parses every
request with vLLM's real ``NCCLWeightTransferEngine.parse_init_info`` / ``parse_update_info`` (what the inference
worker runs before any NCCL call). ``VLLMNCCLWeightSync`` drives them through vLLM's real
``NCCLTrainerWeightTransferEngine`` (trainer_init, send_weights, its ModuleSource and metadata checks); only the
NCCL data plane is stubbed (opening the trainer's communicator and the packed broadcast, both CUDA-only), and
construction sees a GPU. So the request bodies are built by vLLM's trainer code, go through our per-replica
fan-out client, and are parsed by vLLM's worker code. A body vLLM would refuse fails here (the old ``packed`` key
did: ``unexpected keyword argument 'packed'``).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import torch

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", exc_type=ImportError, reason="vLLM is not importable (pip install -e '.[vllm]'; see .ci/run)")

from gym_plugin.errors import ConfigError  # noqa: E402
from gym_plugin.weight_sync import WeightSyncConfig, build_weight_sync  # noqa: E402


class TinyLM(torch.nn.Module):
    """Parameters embed.weight [10, 4], layer.weight [4, 4], layer.bias [4]; head tied to embed."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.layer = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


class ParsingEngineClient:
    """The engine client behind vLLM's router: parses like an NCCL inference worker, records, no NCCL."""

    def __init__(self, world_size: int):
        from types import SimpleNamespace

        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

        # a worker engine without its GPU state: its real parse_* methods, nothing else
        self.worker = object.__new__(NCCLWeightTransferEngine)
        self.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(world_size_across_dp=world_size,
                                                                           world_size=world_size))
        self.init_infos, self.update_infos, self.events = [], [], []
        self.version = "default"

    async def init_weight_transfer_engine(self, request):
        self.init_infos.append(self.worker.parse_init_info(request.init_info))
        self.events.append("init")

    async def start_weight_update(self):
        self.events.append("start")

    async def update_weights(self, request):
        self.update_infos.append(self.worker.parse_update_info(request.update_info))
        self.events.append("update")

    async def finish_weight_update(self, weight_version):
        self.events.append("finish")
        if weight_version is not None:
            self.version = weight_version

    async def get_weight_version(self):
        return self.version

    async def pause_generation(self, mode, clear_cache):
        self.events.append(f"pause:{mode}")

    async def resume_generation(self):
        self.events.append("resume")


class RouterServer:
    """vLLM's RL router on 127.0.0.1 (uvicorn in a thread)."""

    def __init__(self, world_size: int):
        import uvicorn
        from fastapi import FastAPI
        from vllm.entrypoints.rl.online.api_router import router

        app = FastAPI()
        app.include_router(router)
        self.engine = ParsingEngineClient(world_size)
        app.state.engine_client = self.engine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def stub_nccl(monkeypatch):
    """Stub the CUDA-only data plane of vLLM's dense NCCL trainer engine; record what would be broadcast."""
    from vllm.distributed.weight_transfer import nccl_engine

    broadcast: list[list[tuple[str, tuple]]] = []

    class Communicator:
        destroyed = False

        def destroy(self):
            Communicator.destroyed = True

    communicator = Communicator()

    def open_trainer_endpoint(init_info):
        return communicator

    def producer(*, iterator, group, src, post_iter_func, buffer_size_bytes, num_buffers):
        assert group is communicator and src == 0
        broadcast.append([(name, tuple(post_iter_func((name, t)).shape)) for name, t in iterator])

    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", open_trainer_endpoint)
    monkeypatch.setattr(nccl_engine, "packed_nccl_broadcast_producer", producer)
    return broadcast


def build_with_a_gpu(monkeypatch, base_urls, config):
    """Construct as on a GPU machine (construction refuses CPU-only machines, see the test below)."""
    import gym_plugin.weight_sync.vllm as mod

    with monkeypatch.context() as m:
        m.setattr(mod.torch.cuda, "is_available", lambda: True)
        return build_weight_sync(config, base_urls=base_urls)


def test_vllm_nccl_bodies_pass_vllms_own_routes_and_parsers(monkeypatch, stub_nccl):
    model = TinyLM()
    with RouterServer(world_size=1) as r1, RouterServer(world_size=2) as r2:
        cfg = WeightSyncConfig(kind="vllm_nccl", master_port=29555, chunk_bytes=1 << 20, pause_generation=True)
        sync = build_with_a_gpu(monkeypatch, [r1.url + "/v1", r2.url], cfg)

        async def two_syncs():
            try:
                await sync.check()
                return await sync.sync(model, 1), await sync.sync(model, 2)
            finally:
                await sync.close()

        versions = asyncio.run(two_syncs())
    assert versions == (1, 2)
    # one NCCL group: trainer rank 0 + 1 + 2 workers; replica offsets 1 and 2
    assert sync.world_sizes == [1, 2] and sync.rank_offsets == [1, 2]
    [i1], [i2] = r1.engine.init_infos, r2.engine.init_infos
    assert (i1.master_address, i1.master_port, i1.world_size, i1.rank_offset) == ("127.0.0.1", 29555, 4, 1)
    assert i2.rank_offset == 2 and i2.world_size == 4
    assert i1.packed is True and i1.packed_buffer_size_bytes == 1 << 20  # wire params ride the init info
    for r in (r1, r2):
        assert r.engine.events == ["init", "pause:wait", "start", "update", "finish", "resume",
                                   "pause:wait", "start", "update", "finish", "resume"]
        info = r.engine.update_infos[0]
        # named_parameters(): the tied head is not sent (vLLM re-ties it)
        assert info.names == ["embed.weight", "layer.weight", "layer.bias"]
        assert info.dtype_names == ["float32"] * 3 and info.shapes == [[10, 4], [4, 4], [4]]
        assert r.engine.version == "2"
    assert stub_nccl == [[("embed.weight", (10, 4)), ("layer.weight", (4, 4)), ("layer.bias", (4,))]] * 2
    assert sync.engine.model_update_group is None  # close() shut vLLM's trainer engine down


def test_vllms_parser_refuses_the_pre_032_update_body():
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

    worker = object.__new__(NCCLWeightTransferEngine)
    with pytest.raises(ValueError, match="unexpected keyword argument 'packed'"):
        worker.parse_update_info({"names": ["w"], "dtype_names": ["float32"], "shapes": [[1]], "packed": True})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: construction succeeds there")
def test_vllm_nccl_construction_without_a_gpu_says_so():
    with pytest.raises(ConfigError, match=r"NCCL from a CUDA GPU.*this machine has none.*weight_sync=vllm_reload"):
        build_weight_sync(WeightSyncConfig(kind="vllm_nccl"), base_urls=["http://127.0.0.1:9/v1"])
