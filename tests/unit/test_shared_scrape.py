"""GET /metrics's scrape: concurrent GETs share one scrape, reused for its short cache; a client that
leaves does not cancel it; node addresses are not republished."""

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from app.metrics import SharedScrape, render


def test_concurrent_gets_share_one_scrape_until_the_cache_expires():
    scrapes = []

    async def scrape() -> bytes:
        scrapes.append(None)
        await asyncio.sleep(0.1)
        return f"scrape {len(scrapes)}".encode()

    async def run():
        shared = SharedScrape(ttl_s=0.3, scrape=scrape)
        leaver = asyncio.create_task(shared.get())
        await asyncio.sleep(0.01)
        leaver.cancel()  # its client went away mid-scrape
        first = await asyncio.gather(*(shared.get() for _ in range(50)))
        cached = await shared.get()
        await asyncio.sleep(0.35)
        return first, cached, await shared.get()

    first, cached, after_ttl = asyncio.run(run())
    assert set(first) == {b"scrape 1"} and cached == b"scrape 1"
    assert after_ttl == b"scrape 2" and len(scrapes) == 2


RAY_EXPORT = """# HELP ray_serve_num_ongoing_http_requests The number of ongoing requests in this proxy.
# TYPE ray_serve_num_ongoing_http_requests gauge
ray_serve_num_ongoing_http_requests{Component="core_worker",NodeAddress="10.0.0.7",WorkerId="w1",node_id="n1",node_ip_address="10.0.0.7"} 2.0
"""


def test_node_addresses_are_not_republished():
    text = render([RAY_EXPORT]).decode()
    (sample,) = [s for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "ray_serve_num_ongoing_http_requests"]
    assert sample.labels == {"WorkerId": "w1", "node_id": "n1"} and sample.value == 2.0
    assert "10.0.0.7" not in text
