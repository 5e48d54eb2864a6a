"""Weight sync: vLLM 0.32's control plane driven against fake replicas on 127.0.0.1 (vllm_reload, the vllm_nccl
fan-out client, construction-time route checks), the checkpoint route, in process. Against the real vLLM:
tests/peers/test_vllm_*.py."""

from __future__ import annotations

import asyncio

import pytest
import torch
from safetensors.torch import load_file

from gym_plugin.errors import ConfigError
from gym_plugin.http import Transport
from gym_plugin.testing.fake_vllm_control import FakeVLLMControlServer
from gym_plugin.weight_sync import (
    CheckpointWeightSync,
    InProcessWeightSync,
    WeightSyncConfig,
    WeightSyncError,
    build_weight_sync,
    detached_state_dict,
    open_weight_sync,
    server_root,
)
from gym_plugin.weight_sync.vllm import ReplicaFanOutClient, VLLMReloadWeightSync, check_nccl_replicas


class TiedLM(torch.nn.Module):
    """embed [10, 4] tied to head; one [4, 4] layer: parameters embed.weight (40 floats), layer.weight (16),
    layer.bias (4). state_dict also lists head.weight (the tied copy)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.layer = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def run(coro):
    return asyncio.run(coro)


def test_server_root_strips_v1():
    assert server_root("http://h:8000/v1") == "http://h:8000"
    assert server_root("http://h:8000/v1/") == "http://h:8000"
    assert server_root("http://h:8000") == "http://h:8000"


def test_detached_state_dict_unties_shared_storage():
    model = TiedLM()
    sd = detached_state_dict(model)
    assert set(sd) == {"embed.weight", "layer.weight", "layer.bias", "head.weight"}
    assert torch.equal(sd["head.weight"], sd["embed.weight"])
    assert sd["head.weight"].untyped_storage().data_ptr() != sd["embed.weight"].untyped_storage().data_ptr()


async def started(*servers):
    for s in servers:
        await s.start()
    return servers


async def stopped(*servers):
    for s in servers:
        await s.stop()


def test_vllm_reload_updates_every_replica_in_order(tmp_path):
    model = TiedLM()

    async def scenario():
        r1, r2 = await started(FakeVLLMControlServer("r1", world_size=1), FakeVLLMControlServer("r2", world_size=2))
        sync = await open_weight_sync(WeightSyncConfig(kind="vllm_reload", directory=str(tmp_path)),
                                      base_urls=[r1.url + "/v1", r2.url])
        try:
            v1 = await sync.sync(model, 3)
            with torch.no_grad():
                model.layer.bias.fill_(0.25)
            v2 = await sync.sync(model, 4)
        finally:
            await sync.close()
            await stopped(r1, r2)
        return r1, r2, sync, (v1, v2)

    r1, r2, sync, versions = run(scenario())
    assert versions == (3, 4)
    one_sync = ["/collective_rpc", "/reset_prefix_cache", "/update_weight_version", "/weight_info"]
    for r in (r1, r2):
        # the probes of POST routes are GETs that answer 405 and are not recorded: only /weight_info is
        assert r.routes_called == ["/weight_info", "/collective_rpc"] + one_sync + one_sync, r.routes_called
        assert r.weight_version == "4"
        assert sorted(r.received_names) == ["embed.weight", "head.weight", "layer.bias", "layer.weight"]
    reload = [c.body for c in r1.calls if c.route == "/collective_rpc"][1]
    assert reload == {"method": "gym_plugin_reload_weights", "kwargs": {"weights_path": str(tmp_path / "v000003")},
                      "timeout": 600.0}
    assert [c.body for c in r2.calls if c.route == "/update_weight_version"] == [{"new_version": "3"},
                                                                                {"new_version": "4"}]
    # keep_last=1: v3's folder was removed once both replicas serve v4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000004"]
    loaded = load_file(str(tmp_path / "v000004" / "model.safetensors"))
    assert torch.equal(loaded["layer.bias"], torch.full((4,), 0.25))
    assert torch.equal(loaded["head.weight"], model.embed.weight.detach())  # tied head written as its own copy


def test_vllm_reload_pause_and_busy_prefix_cache(tmp_path):
    async def scenario():
        (r,) = await started(FakeVLLMControlServer("r", busy_resets=2))
        sync = VLLMReloadWeightSync([r.url], tmp_path, WeightSyncConfig(kind="vllm_reload", pause_generation=True,
                                                                        verify_version=False))
        try:
            await sync.sync(TiedLM(), 1)
        finally:
            await sync.close()
            await stopped(r)
        return r

    r = run(scenario())
    # /reset_prefix_cache answered success=false twice (running requests) and was asked again
    assert r.routes_called == ["/pause", "/collective_rpc", "/reset_prefix_cache", "/reset_prefix_cache",
                               "/reset_prefix_cache", "/update_weight_version", "/resume"]
    assert r.calls[0].body is None and not r.paused


def test_vllm_reload_error_names_the_failing_replica(tmp_path):
    async def scenario():
        ok, bad = await started(FakeVLLMControlServer("ok"),
                                FakeVLLMControlServer("bad", fail_routes={"/update_weight_version": 500}))
        sync = VLLMReloadWeightSync([ok.url, bad.url], tmp_path)
        try:
            with pytest.raises(WeightSyncError) as info:
                await sync.sync(TiedLM(), 1)
        finally:
            await sync.close()
            await stopped(ok, bad)
        return bad, info.value

    bad, err = run(scenario())
    assert err.url == bad.url
    assert bad.url in str(err) and "/update_weight_version" in str(err) and "500" in str(err)


def test_vllm_reload_detects_replica_that_kept_old_version(tmp_path):
    class Stale(FakeVLLMControlServer):
        async def update_weight_version(self, body, ctx):
            return {"success": True}

    async def scenario():
        (r,) = await started(Stale("stale"))
        sync = VLLMReloadWeightSync([r.url], tmp_path)
        try:
            with pytest.raises(WeightSyncError, match=r"weight_version='default'.*expected '2'") as info:
                await sync.sync(TiedLM(), 2)
        finally:
            await sync.close()
            await stopped(r)
        return r, info.value

    r, err = run(scenario())
    assert err.url == r.url


@pytest.mark.parametrize("flags,names", [
    ({"dev_mode": False}, ["POST /collective_rpc, POST /reset_prefix_cache, POST /update_weight_version, "
                           "GET /weight_info", "VLLM_SERVER_DEV_MODE=1"]),
    ({"extension": False}, ["gym_plugin_extension_info answered HTTP 500",
                            "--worker-extension-cls gym_plugin.vllm.worker.GymPluginWorkerExtension"]),
])
def test_vllm_reload_check_names_the_missing_server_flag(tmp_path, flags, names):
    async def scenario():
        ok, bad = await started(FakeVLLMControlServer("ok"), FakeVLLMControlServer("bad", **flags))
        try:
            with pytest.raises(WeightSyncError) as info:
                await open_weight_sync(WeightSyncConfig(kind="vllm_reload", directory=str(tmp_path)),
                                       base_urls=[ok.url + "/v1", bad.url + "/v1"])
        finally:
            await stopped(ok, bad)
        return bad, info.value

    bad, err = run(scenario())
    assert err.url == bad.url + "/v1" and f"replica {bad.url}/v1" in str(err)
    for name in names:
        assert name in str(err), str(err)
    assert not [c for c in bad.calls if c.route == "/collective_rpc" and c.body.get("method") != "gym_plugin_extension_info"]


def test_checkpoint_check_refuses_a_vllm_server(tmp_path):
    async def scenario():
        (vllm,) = await started(FakeVLLMControlServer("vllm", embedded=False))
        try:
            with pytest.raises(WeightSyncError) as info:
                await open_weight_sync(WeightSyncConfig(kind="checkpoint", directory=str(tmp_path)),
                                       base_urls=[vllm.url + "/v1"])
        finally:
            await stopped(vllm)
        return info.value

    err = run(scenario())
    assert "has no POST /update_weights_from_path" in str(err) and "use weight_sync=vllm_reload" in str(err)


def test_unreachable_replica_is_named_at_check(tmp_path):
    async def scenario():
        with pytest.raises(WeightSyncError, match=r"http://127.0.0.1:9/v1 did not answer the weight_sync=vllm_reload"):
            await open_weight_sync(WeightSyncConfig(kind="vllm_reload", directory=str(tmp_path), timeout_s=5),
                                   base_urls=["http://127.0.0.1:9/v1"])

    run(scenario())


def test_nccl_fan_out_client_gives_each_replica_its_rank_offset():
    """vLLM's trainer engine calls these four blocking methods from its threads; the client posts each call to
    every replica. Replicas of world size 1 and 2: one group of 1 (trainer) + 1 + 2 = 4 ranks."""
    async def scenario():
        r1, r2 = await started(FakeVLLMControlServer("r1", world_size=1), FakeVLLMControlServer("r2", world_size=2))
        from gym_plugin.weight_sync.vllm import _Replicas

        replicas = _Replicas([r1.url + "/v1", r2.url], WeightSyncConfig(kind="vllm_nccl"), None)
        client = ReplicaFanOutClient(replicas, asyncio.get_running_loop(), [1, 2])
        # what vLLM's NCCLTrainerWeightTransferEngine.trainer_init sends (worker_init_payload of its init info)
        init = {"master_address": "127.0.0.1", "master_port": 29555, "rank_offset": 1, "world_size": 4,
                "packed": True, "packed_buffer_size_bytes": 1 << 20, "packed_num_buffers": 2}
        update = {"names": ["embed.weight", "layer.weight"], "dtype_names": ["float32", "float32"],
                  "shapes": [[10, 4], [4, 4]]}

        def trainer_thread():
            client.init_weight_transfer_engine(init)
            client.version = "7"
            client.start_weight_update()
            client.update_weights(update)
            client.finish_weight_update()

        try:
            await asyncio.to_thread(trainer_thread)
            await asyncio.to_thread(client.start_weight_update)
            with pytest.raises(WeightSyncError, match="unexpected keyword argument 'packed'"):
                # the body gym_plugin sent before vLLM 0.32: refused as vLLM refuses it
                await asyncio.to_thread(client.update_weights, {**update, "packed": True})
        finally:
            await replicas.close()
            await stopped(r1, r2)
        return r1, r2, update

    r1, r2, update = run(scenario())
    assert [c.body["init_info"]["rank_offset"] for c in r1.calls + r2.calls
            if c.route == "/init_weight_transfer_engine"] == [1, 2]
    for r in (r1, r2):
        assert r.routes_called[:4] == ["/init_weight_transfer_engine", "/start_weight_update", "/update_weights",
                                       "/finish_weight_update"]
        assert r.weight_version == "7"
        assert r.calls[2].body == {"update_info": update}  # passed through as vLLM's engine built it
        assert r.calls[1].body is None  # /start_weight_update has no body (vLLM's HTTP client sends none)


def test_nccl_check_names_the_weight_transfer_flag():
    async def scenario():
        (r,) = await started(FakeVLLMControlServer("r", weight_transfer=False))
        transport = Transport()
        try:
            with pytest.raises(WeightSyncError, match=r"--weight-transfer-config '\{\"backend\": \"nccl\"\}'"):
                await check_nccl_replicas(transport, [r.url])
        finally:
            await transport.close()
            await stopped(r)

    run(scenario())


def test_vllm_nccl_construction_says_what_is_missing():
    """Without vLLM: how to install it; with vLLM but no GPU: that NCCL needs one and vllm_reload does not."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"needs vLLM >= 0.32.*vllm_reload"):
            build_weight_sync(WeightSyncConfig(kind="vllm_nccl"), base_urls=["http://127.0.0.1:9/v1"])
        return
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: construction succeeds (tests/peers/test_vllm_weight_transfer.py)")
    with pytest.raises(ConfigError, match=r"NCCL from a CUDA GPU.*has none.*Use weight_sync=vllm_reload"):
        build_weight_sync(WeightSyncConfig(kind="vllm_nccl"), base_urls=["http://127.0.0.1:9/v1"])


def test_checkpoint_sync_writes_file_and_every_replica_reports_version(tmp_path):
    model = TiedLM()

    async def scenario():
        r1, r2 = FakeVLLMControlServer("e1"), FakeVLLMControlServer("e2")
        await r1.start(), await r2.start()
        sync = CheckpointWeightSync([r1.url + "/v1", r2.url], tmp_path, keep_last=1)
        try:
            v1 = await sync.sync(model, 1)
            with torch.no_grad():
                model.layer.bias.fill_(0.5)
            v2 = await sync.sync(model, 2)
        finally:
            await sync.close()
            await r1.stop(), await r2.stop()
        return r1, r2, v1, v2

    r1, r2, v1, v2 = run(scenario())
    assert (v1, v2) == (1, 2)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["policy_v000002.safetensors"]  # keep_last=1 removed v1 after both replicas moved on
    for r in (r1, r2):
        assert r.routes_called == ["/update_weights_from_path"] * 2
        assert r.weight_version == "2"
        assert sorted(r.received_names) == ["embed.weight", "head.weight", "layer.bias", "layer.weight"]
    loaded = load_file(str(tmp_path / "policy_v000002.safetensors"))
    assert torch.equal(loaded["layer.bias"], torch.full((4,), 0.5))
    assert torch.equal(loaded["head.weight"], model.embed.weight.detach())


def test_checkpoint_sync_detects_replica_that_did_not_advance(tmp_path):
    async def scenario():
        r = FakeVLLMControlServer("e")
        await r.start()
        sync = CheckpointWeightSync([r.url], tmp_path)
        try:
            assert await sync.sync(TiedLM(), 1) == 1  # the fake counts loads: 0 -> 1
            r.stale_loads = True
            with pytest.raises(WeightSyncError, match="greater than 1") as info:
                await sync.sync(TiedLM(), 2)
        finally:
            await sync.close()
            await r.stop()
        return r, info.value

    r, err = run(scenario())
    assert err.url == r.url


def test_checkpoint_sync_error_names_replica(tmp_path):
    async def scenario():
        bad = FakeVLLMControlServer("bad", fail_routes={"/update_weights_from_path": 503})
        await bad.start()
        sync = CheckpointWeightSync([bad.url], tmp_path)
        try:
            with pytest.raises(WeightSyncError) as info:
                await sync.sync(TiedLM(), 1)
        finally:
            await sync.close()
            await bad.stop()
        return bad, info.value

    bad, err = run(scenario())
    assert err.url == bad.url and bad.url in str(err)


def test_inprocess_sync_copies_into_server_object():
    class Holder:
        def __init__(self):
            self.model = TiedLM()
            self.version = 0

        def update_weights(self, state_dict):
            self.model.load_state_dict(state_dict)
            self.version += 1
            return self.version

    trainer, holder = TiedLM(), Holder()
    assert not torch.equal(trainer.layer.weight, holder.model.layer.weight)  # different random inits
    v = run(InProcessWeightSync(holder).sync(trainer, 1))
    assert v == 1
    assert torch.equal(trainer.layer.weight, holder.model.layer.weight)
    assert holder.model.layer.weight.data_ptr() != trainer.layer.weight.data_ptr()  # a copy, not shared


def test_build_weight_sync_errors():
    with pytest.raises(ConfigError, match="Did you mean 'checkpoint'"):
        build_weight_sync(WeightSyncConfig(kind="checkpiont"))
    with pytest.raises(ConfigError, match="policy=embedded"):
        build_weight_sync(WeightSyncConfig(kind="inprocess"))
    with pytest.raises(ConfigError, match="at least one"):
        build_weight_sync(WeightSyncConfig(kind="checkpoint", directory="/tmp/x"), base_urls=[])
