"""AWS event-stream framing (`application/vnd.amazon.eventstream`), the binary stream that Bedrock's
converse-stream answers in. botocore only decodes it, so the encoder is ours.

One message: prelude (total length, headers length: 4-byte big-endian each) + CRC32 of the prelude,
then the headers, the payload, and a CRC32 of everything before it. Only string headers are needed."""

from __future__ import annotations

import json
import struct
import zlib

STRING_HEADER = 7  # the header value type for UTF-8 strings
PRELUDE_BYTES = 8
CRC_BYTES = 4


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    encoded_headers = b"".join(_encode_header(name, value) for name, value in headers.items())
    total = PRELUDE_BYTES + CRC_BYTES + len(encoded_headers) + len(payload) + CRC_BYTES
    prelude = struct.pack(">II", total, len(encoded_headers))
    head = prelude + struct.pack(">I", zlib.crc32(prelude))
    body = head + encoded_headers + payload
    return body + struct.pack(">I", zlib.crc32(body))


def _encode_header(name: str, value: str) -> bytes:
    name_bytes, value_bytes = name.encode(), value.encode()
    return struct.pack(">B", len(name_bytes)) + name_bytes + struct.pack(">BH", STRING_HEADER, len(value_bytes)) + value_bytes


def event(event_type: str, payload: dict) -> bytes:
    """One event of a modelled event stream: what botocore turns into `{event_type: payload}`."""
    headers = {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}
    return encode_message(headers, json.dumps(payload, separators=(",", ":")).encode())


def exception(exception_type: str, message: str) -> bytes:
    """An error after the stream began: botocore raises it as an `EventStreamError` of that type."""
    headers = {":exception-type": exception_type, ":content-type": "application/json", ":message-type": "exception"}
    return encode_message(headers, json.dumps({"message": message}).encode())
