"""InFlightCap without Ray: POSTs past the limit are refused at once while earlier ones still run;
reads pass; a finished call frees its slot."""

import asyncio

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from app.api.gate import InFlightCap


def capped_app(release: asyncio.Event) -> FastAPI:
    api = FastAPI()

    @api.post("/work")
    async def work():
        await release.wait()
        return {"done": True}

    @api.get("/read")
    async def read():
        return {"ok": True}

    def reject(request, err):
        return JSONResponse({"error": {"code": err.code}}, status_code=err.status, headers=err.headers)

    api.add_middleware(InFlightCap, limit=1, reject=reject)
    return api


def test_past_the_limit_is_refused_until_a_slot_frees():
    async def run():
        release = asyncio.Event()
        transport = httpx.ASGITransport(app=capped_app(release))
        async with httpx.AsyncClient(transport=transport, base_url="http://conduit") as http:
            holder = asyncio.create_task(http.post("/work"))
            await asyncio.sleep(0.05)  # the holder is inside the app
            refused = await asyncio.wait_for(http.post("/work"), 2)  # not held until a slot frees
            read = await http.get("/read")
            release.set()
            held = await holder
            after = await http.post("/work")
        return refused, read, held, after

    refused, read, held, after = asyncio.run(run())
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_overloaded"
    assert refused.headers["retry-after"] == "1"
    assert read.status_code == held.status_code == after.status_code == 200
