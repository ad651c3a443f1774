"""GET /metrics read back as numbers: one sample per (name, labels), so a test
compares two scrapes instead of matching exposition text::

    before = await scrape(srv.session, srv.url("/metrics"))
    ...
    assert delta(before, after, "aiwfd_agent_calls_total", agent="greeter", outcome="ok") == 1
"""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Sample", "Samples", "delta", "parse", "scrape", "value"]

Sample = tuple[str, frozenset[tuple[str, str]]]
Samples = dict[Sample, float]


def parse(text: str) -> Samples:
    """Prometheus text exposition → {(sample name, labels): value}."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    """GET `url`, which must answer 200 in the text format, parsed."""
    async with session.get(url) as r:
        assert r.status == 200, r.status
        assert r.headers["Content-Type"].startswith("text/plain"), r.headers["Content-Type"]
        return parse(await r.text())


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels; 0 when absent (a counter not yet moved)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)
