"""The event-stream encoder, decoded by botocore's own parser (what boto3 runs on converse-stream)."""

import botocore.session
import pytest
from botocore.eventstream import ChecksumMismatch, EventStream, EventStreamBuffer, EventStreamError
from botocore.parsers import EventStreamJSONParser

from app.api.wire import eventstream


class Chunks:
    """A raw HTTP body as botocore reads it, arriving in small pieces."""

    def __init__(self, data: bytes, size: int = 7):
        self.pieces = [data[i : i + size] for i in range(0, len(data), size)]

    def stream(self):
        yield from self.pieces


def converse_stream(data: bytes) -> EventStream:
    model = botocore.session.get_session().get_service_model("bedrock-runtime")
    shape = model.operation_model("ConverseStream").output_shape.members["stream"]
    return EventStream(Chunks(data), shape, EventStreamJSONParser(), "ConverseStream")


def test_message_decodes_with_botocore_buffer():
    data = eventstream.encode_message({":event-type": "x", "name": "välue"}, b'{"a":1}')
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    (message,) = list(buffer)
    assert message.headers == {":event-type": "x", "name": "välue"}
    assert message.payload == b'{"a":1}'
    assert int.from_bytes(data[:4], "big") == len(data)  # the prelude's total length


def test_corrupted_message_fails_the_checksum():
    data = bytearray(eventstream.event("messageStart", {"role": "assistant"}))
    data[-6] ^= 0xFF  # a payload byte
    buffer = EventStreamBuffer()
    buffer.add_data(bytes(data))
    with pytest.raises(ChecksumMismatch):
        list(buffer)


def test_converse_stream_events_parse_as_boto3_returns_them():
    data = b"".join([
        eventstream.event("messageStart", {"role": "assistant"}),
        eventstream.event("contentBlockDelta", {"delta": {"text": "Hi"}, "contentBlockIndex": 0}),
        eventstream.event("contentBlockStop", {"contentBlockIndex": 0}),
        eventstream.event("messageStop", {"stopReason": "end_turn"}),
        eventstream.event("metadata", {"usage": {"inputTokens": 3, "outputTokens": 1, "totalTokens": 4},
                                       "metrics": {"latencyMs": 12}}),
    ])
    assert list(converse_stream(data)) == [
        {"messageStart": {"role": "assistant"}},
        {"contentBlockDelta": {"delta": {"text": "Hi"}, "contentBlockIndex": 0}},
        {"contentBlockStop": {"contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "end_turn"}},
        {"metadata": {"usage": {"inputTokens": 3, "outputTokens": 1, "totalTokens": 4}, "metrics": {"latencyMs": 12}}},
    ]


def test_exception_message_raises_its_type():
    data = eventstream.event("messageStart", {"role": "assistant"}) + eventstream.exception(
        "internalServerException", "generation failed"
    )
    events = iter(converse_stream(data))
    assert next(events) == {"messageStart": {"role": "assistant"}}
    with pytest.raises(EventStreamError) as raised:
        next(events)
    assert raised.value.response["Error"] == {"Code": "internalServerException", "Message": "generation failed"}
