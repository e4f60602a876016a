"""Read a W&B offline run file (``run-ID.wandb``) back: the records ``wandb sync`` would upload.

Why here: ``wandb.Api`` needs the server, and the SDK no longer ships a Python reader of its run files
(its Go core writes and syncs them). The file is a LevelDB log (github.com/google/leveldb,
doc/log_format.md): a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each a
7-byte header (CRC-32 of type and data, length, type: full / first / middle / last) and data; a
record is the data of one full chunk, or of first + middle... + last chunks, and is one protobuf
``Record`` of the SDK's own schema (``wandb.proto.wandb_internal_pb2``).
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def chunks_to_records(data: bytes) -> list[bytes]:
    ident, _magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B", f"not a W&B run file (header {ident!r})"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer: zero padding
            pos += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero-filled space, e.g. a preallocated tail
            break
        body = data[pos + HEADER : pos + HEADER + length]
        assert zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum, f"bad checksum at {pos}"
        pos += HEADER + length
        if kind == FULL:
            records.append(body)
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            records.append(pending + body)
            pending = b""
    return records


def read_offline_run(run_folder: Path) -> dict[str, Any]:
    """The run's config, summary (last value of each key) and history rows, as the SDK recorded them."""
    from wandb.proto import wandb_internal_pb2 as pb

    (run_file,) = Path(run_folder).glob("run-*.wandb")
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    artifacts: list[Any] = []
    for raw in chunks_to_records(run_file.read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
        elif kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
        elif kind == "artifact":
            artifacts.append(record.artifact)
    return {"config": config, "summary": summary, "history": history, "artifacts": artifacts}
