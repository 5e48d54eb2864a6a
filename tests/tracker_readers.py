"""Read back what gym_plugin.trackers wrote, with each library's own reader (tests only):

- TensorBoard: ``EventAccumulator`` (scalars, text, images, the HParams plugin's session start);
- W&B: an offline run's ``run-<id>.wandb`` file is a LevelDB-style log of ``wandb_internal_pb2.Record`` protos
  (W&B's own schema). wandb 0.31 reads it only in its Go core (``wandb sync``, ``wandb beta leet``) and dropped its
  Python reader (``wandb.sdk.internal.datastore``), so ``wandb_records`` undoes the framing (32 KiB blocks of
  7-byte-headed chunks, each checksummed with CRC-32 seeded by its type byte; the checksum is checked, so a
  wrong framing cannot pass) and parses every record with W&B's own protobuf classes;
- MLflow: ``MlflowClient`` on the tracking URI.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator


def tensorboard_events(log_dir: Path) -> dict[str, Any]:
    """{'scalars': {tag: [(step, value)]}, 'texts': {tag: [(step, text)]}, 'images': {tag: [(step, w, h)]},
    'hparams': {name: value}} of a TensorBoard log folder (purged steps already dropped by the reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    texts = {t: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(t)] for t in tags["tensors"]}
    images = {t: [(e.step, e.width, e.height) for e in acc.Images(t)] for t in tags["images"]}
    hparams = {}
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            for name, value in data.session_start_info.hparams.items():
                hparams[name] = getattr(value, value.WhichOneof("kind"))
    return {"scalars": scalars, "texts": texts, "images": images, "hparams": hparams}


_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[Any]:
    """Every ``wandb_internal_pb2.Record`` of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]  # W&B's file header: ident, magic 0xBEE1, version
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad checksum at byte {pos}"
        pos += _HEADER + length
        if kind in (_FIRST, _MIDDLE):
            pending = (b"" if kind == _FIRST else pending) + chunk
            continue
        raw, pending = (chunk if kind == _FULL else pending + chunk), b""
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        yield record


def wandb_offline_runs(run_dir: Path) -> list[dict[str, Any]]:
    """The offline W&B runs under ``run_dir/wandb``, oldest first: {'id', 'history': [{key: value}],
    'config': {key: value}, 'summary': {key: value}, 'tables': [table JSON]} (values JSON-decoded)."""
    runs = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        [path] = folder.glob("run-*.wandb")
        run: dict[str, Any] = {"id": None, "history": [], "config": {}, "summary": {}}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
                run["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "config":
                run["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
            elif kind == "history":
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.history.item})
            elif kind == "summary":
                run["summary"].update({u.key or "/".join(u.nested_key): json.loads(u.value_json)
                                       for u in record.summary.update})
        run["tables"] = [json.loads(p.read_text()) for p in sorted((folder / "files").rglob("*.table.json"))]
        runs.append(run)
    return runs
