"""Weight sync: vLLM control plane driven against fake replicas on 127.0.0.1, checkpoint route, in process."""

from __future__ import annotations

import asyncio

import pytest
import torch
from safetensors.torch import load_file

from gym_plugin.errors import ConfigError
from gym_plugin.testing.fake_vllm_control import FakeVLLMControlServer, RecordingSender
from gym_plugin.weight_sync import (
    CheckpointWeightSync,
    InProcessWeightSync,
    NCCLSender,
    VLLMWeightSync,
    WeightSyncConfig,
    WeightSyncError,
    build_weight_sync,
    chunk_parameters,
    detached_state_dict,
    server_root,
)


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


def test_chunk_parameters_respects_byte_limit_and_order():
    a, b, c, big = torch.zeros(4), torch.zeros(8), torch.zeros(2), torch.zeros(20)  # 16, 32, 8, 80 bytes
    named = [("a", a), ("b", b), ("c", c), ("big", big)]
    chunks = chunk_parameters(named, chunk_bytes=40)
    # a=16; a+b=48 > 40 -> new chunk; b+c=32+8=40 <= 40 -> same chunk; big=80 > 40 -> a chunk of its own
    assert [[n for n, _ in ch] for ch in chunks] == [["a"], ["b", "c"], ["big"]]


def test_detached_state_dict_unties_shared_storage():
    model = TiedLM()
    sd = detached_state_dict(model)
    assert set(sd) == {"embed.weight", "layer.weight", "layer.bias", "head.weight"}
    assert torch.equal(sd["head.weight"], sd["embed.weight"])
    assert sd["head.weight"].untyped_storage().data_ptr() != sd["embed.weight"].untyped_storage().data_ptr()


def test_vllm_sync_updates_every_replica_in_order():
    async def scenario():
        r1, r2 = FakeVLLMControlServer("r1", world_size=1), FakeVLLMControlServer("r2", world_size=2)
        await r1.start(), await r2.start()
        sender = RecordingSender()
        # embed.weight 40 floats = 160 B, layer.weight 64 B, layer.bias 16 B; limit 100 B ->
        # chunks [embed.weight], [layer.weight, layer.bias] (64 + 16 = 80 <= 100)
        cfg = WeightSyncConfig(kind="vllm_nccl", chunk_bytes=100, master_port=29555)
        sync = VLLMWeightSync([r1.url + "/v1", r2.url + "/v1"], cfg, sender=sender)
        try:
            v = await sync.sync(TiedLM(), 3)
            v2 = await sync.sync(TiedLM(), 4)
        finally:
            await sync.close()
            await r1.stop(), await r2.stop()
        return r1, r2, sender, sync, v, v2

    r1, r2, sender, sync, v, v2 = run(scenario())
    assert (v, v2) == (3, 4)
    # world sizes 1 and 2 -> one group of 1 (trainer) + 1 + 2 = 4 ranks; replica offsets 1 and 1 + 1 = 2
    assert sync.world_sizes == [1, 2] and sync.rank_offsets == [1, 2]
    assert sender.init_args == ("127.0.0.1", 29555, 4)
    init1 = [c.body for c in r1.calls if c.route == "/init_weight_transfer_engine"]
    init2 = [c.body for c in r2.calls if c.route == "/init_weight_transfer_engine"]
    assert init1 == [{"init_info": {"master_address": "127.0.0.1", "master_port": 29555, "rank_offset": 1,
                                    "world_size": 4}}]
    assert init2[0]["init_info"]["rank_offset"] == 2
    one_sync = ["/start_weight_update", "/update_weights", "/update_weights", "/finish_weight_update",
                "/weight_info"]
    for r in (r1, r2):
        # init once, then the same five-call sequence per sync
        assert r.routes_called == ["/get_world_size", "/init_weight_transfer_engine"] + one_sync + one_sync
        assert r.weight_version == "4"
        assert r.received_names == ["embed.weight", "layer.weight", "layer.bias"]  # tied head not sent
    # the data plane sent the same chunks in the same order, twice
    assert sender.sent == [["embed.weight"], ["layer.weight", "layer.bias"]] * 2
    update = next(c.body for c in r1.calls if c.route == "/update_weights")
    assert update == {"update_info": {"names": ["embed.weight"], "dtype_names": ["float32"], "shapes": [[10, 4]],
                                      "packed": True}}
    finish = [c.body for c in r2.calls if c.route == "/finish_weight_update"]
    assert finish == [{"weight_version": "3"}, {"weight_version": "4"}]


def test_vllm_sync_pause_resume_wraps_update():
    async def scenario():
        r = FakeVLLMControlServer("r")
        await r.start()
        sync = VLLMWeightSync([r.url], WeightSyncConfig(kind="vllm_nccl", pause_generation=True,
                                                        verify_version=False), sender=RecordingSender())
        try:
            await sync.sync(TiedLM(), 1)
        finally:
            await sync.close()
            await r.stop()
        return r

    r = run(scenario())
    assert r.routes_called[2:] == ["/pause", "/start_weight_update", "/update_weights", "/finish_weight_update",
                                   "/resume"]


def test_vllm_sync_error_names_the_failing_replica():
    async def scenario():
        ok, bad = FakeVLLMControlServer("ok"), FakeVLLMControlServer("bad", fail_routes={"/update_weights": 500})
        await ok.start(), await bad.start()
        sync = VLLMWeightSync([ok.url, bad.url], WeightSyncConfig(kind="vllm_nccl"), sender=RecordingSender())
        try:
            with pytest.raises(WeightSyncError) as info:
                await sync.sync(TiedLM(), 1)
        finally:
            await sync.close()
            await ok.stop(), await bad.stop()
        return bad, info.value

    bad, err = run(scenario())
    assert err.url == bad.url
    assert bad.url in str(err) and "/update_weights" in str(err) and "500" in str(err)


def test_vllm_sync_detects_replica_that_kept_old_version():
    class Stale(FakeVLLMControlServer):
        async def weight_info(self, body, ctx):
            return {"weight_version": "0"}

    async def scenario():
        r = Stale("stale")
        await r.start()
        sync = VLLMWeightSync([r.url], WeightSyncConfig(kind="vllm_nccl"), sender=RecordingSender())
        try:
            with pytest.raises(WeightSyncError, match=r"weight_version='0'.*expected '2'") as info:
                await sync.sync(TiedLM(), 2)
        finally:
            await sync.close()
            await r.stop()
        return r, info.value

    r, err = run(scenario())
    assert err.url == r.url


def test_vllm_sync_unreachable_replica_is_named():
    async def scenario():
        sync = VLLMWeightSync(["http://127.0.0.1:9/v1"], WeightSyncConfig(kind="vllm_nccl", timeout_s=5),
                              sender=RecordingSender())
        try:
            with pytest.raises(WeightSyncError, match=r"http://127.0.0.1:9/v1.*get_world_size"):
                await sync.sync(TiedLM(), 1)
        finally:
            await sync.close()

    run(scenario())


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


def test_nccl_sender_without_vllm_says_how_to_install():
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install vllm"):
            NCCLSender()
    else:
        pytest.skip("vllm is installed here")
