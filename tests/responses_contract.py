"""OpenAI's published contract for Responses stream events: each event checked against its own
schema (found by its `type`), whose errors say more than the union ResponseStreamEvent's."""

from __future__ import annotations

import json
from functools import cache

from tests.openapi_contract import DOCUMENT, validate


@cache
def _event_schemas() -> dict[str, str]:
    schemas = json.loads(DOCUMENT.read_text())["components"]["schemas"]
    names = {}
    for option in schemas["ResponseStreamEvent"]["anyOf"]:
        name = option["$ref"].rsplit("/", 1)[-1]
        for kind in schemas[name]["properties"]["type"].get("enum", []):
            names[kind] = name
    return names


def validate_event(event: dict) -> None:
    schema = _event_schemas().get(event.get("type"))
    assert schema is not None, f"no stream event of type {event.get('type')!r} in OpenAI's document"
    validate(event, schema)
