"""Reading TGI's streamed events in the e2e tests: each event carries its token's id, so a stream's
tokens can be compared with `generate` exactly."""

import json

import httpx


async def read_tgi_events(response: httpx.Response, result: dict, drop_after: int | None = None) -> dict:
    """`response`'s events into `result` as they arrive: token ids in order ("ids"), error events
    ("errors"), the finish_reason ("finish"); stops reading after `drop_after` tokens when given."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        event = json.loads(line.removeprefix("data:"))
        if "error" in event:
            result["errors"].append(event)
            continue
        result["ids"].append(event["token"]["id"])
        if event["details"]:
            result["finish"] = event["details"]["finish_reason"]
        if drop_after is not None and len(result["ids"]) >= drop_after:
            break
    return result
