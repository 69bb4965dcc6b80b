"""The standard gRPC health check (grpc.health.v1.Health/Check) without grpcio-health-checking.

The two messages are tiny, so they are encoded by hand in protobuf's wire format:
``HealthCheckRequest { string service = 1; }`` and
``HealthCheckResponse { ServingStatus status = 1; }``.
"""

from __future__ import annotations

import enum

CHECK_METHOD = "/grpc.health.v1.Health/Check"


class HealthStatus(enum.IntEnum):
    """grpc.health.v1.HealthCheckResponse.ServingStatus."""

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2
    SERVICE_UNKNOWN = 3  # only sent by Watch

    @classmethod
    def of(cls, value: int) -> HealthStatus:
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def encode_request(service: str) -> bytes:
    """Serialize a HealthCheckRequest (an empty service is the proto3 default: no bytes)."""
    if not service:
        return b""
    raw = service.encode("utf-8")
    return b"\x0a" + _varint(len(raw)) + raw


def decode_response(data: bytes) -> HealthStatus:
    """Parse a HealthCheckResponse, skipping fields this client does not know."""
    status = 0
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
            if number == 1:
                status = value
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            pos += length
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    if pos != len(data):
        raise ValueError("truncated message")
    return HealthStatus.of(status)
