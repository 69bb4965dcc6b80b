"""A loopback load generator for unary RPCs, run as a process of its own.

    python tests/bench/loadgen.py SPEC.json

SPEC: {"phases": [{"target": "127.0.0.1:PORT", "method": "/agentplane.v1.SessionService/GetSession",
"request_hex": "<serialized request>", "token": "...", "tasks": 8, "warmup_s": 0.3,
"duration_s": 1.5}, ...]}. Phases run one after another (so A B A B phases interleave two
servers); `tasks` grpc.aio tasks call back to back. Requests and responses stay bytes here (no
protobuf work in the generator), so both servers face exactly the same client. Prints one JSON
line per phase: {"rps", "p50_ms", "p99_ms", "n", "errors"}, counting the calls that ended
within the measured window after the warm-up.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else 0.0


async def phase(channel: grpc.aio.Channel, spec: dict[str, Any]) -> dict[str, Any]:
    call = channel.unary_unary(spec["method"])  # no (de)serializers: bytes in, bytes out
    request = bytes.fromhex(spec["request_hex"])
    metadata = (("authorization", f"Bearer {spec['token']}"),)
    begin = time.perf_counter() + spec.get("warmup_s", 0.3)
    end = begin + spec["duration_s"]
    latencies: list[float] = []
    errors: list[str] = []

    async def caller() -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            try:
                await call(request, metadata=metadata, timeout=10)
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")
                continue
            t1 = time.perf_counter()
            if begin <= t1 <= end:
                latencies.append(t1 - t0)

    await asyncio.gather(*(caller() for _ in range(spec["tasks"])))
    return {
        "rps": len(latencies) / spec["duration_s"],
        "p50_ms": _percentile(latencies, 50) * 1000,
        "p99_ms": _percentile(latencies, 99) * 1000,
        "n": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
    }


async def main(spec: dict[str, Any]) -> None:
    channels: dict[str, grpc.aio.Channel] = {}
    try:
        for p in spec["phases"]:
            if p["target"] not in channels:
                channels[p["target"]] = grpc.aio.insecure_channel(p["target"])
                await asyncio.wait_for(channels[p["target"]].channel_ready(), 10)
            print(json.dumps(await phase(channels[p["target"]], p)), flush=True)
    finally:
        for channel in channels.values():
            await channel.close()


if __name__ == "__main__":
    asyncio.run(main(json.loads(Path(sys.argv[1]).read_text())))
