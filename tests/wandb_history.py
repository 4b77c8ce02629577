"""Read a W&B run's history back from its `.wandb` file (no reader ships with wandb).

The file is a LevelDB-style log: a 7-byte header (':W&B', magic, version), then 32 KiB blocks of
records (crc32 uint32, length uint16, type uint8: FULL/FIRST/MIDDLE/LAST, data); each complete
payload is a serialised `wandb_internal_pb2.Record`.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def payloads(path: Path):
    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B datastore"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(raw):
        if BLOCK - pos % BLOCK < HEADER:  # block trailer: zero padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos:pos + HEADER])
        data = raw[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, "corrupt record"
        if kind == FULL:
            yield data
        elif kind == FIRST:
            pending = data
        elif kind == MIDDLE:
            pending += data
        elif kind == LAST:
            yield pending + data


def history(path: Path) -> list[dict]:
    """One dict per logged history row: {'_step': step, key: value, ...}."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for data in payloads(path):
        record = pb.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            row = {"_step": record.history.step.num}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows
