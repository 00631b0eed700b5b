"""Reading the server's Prometheus metrics in tests."""

from __future__ import annotations

import httpx


def read_metric(http: httpx.Client, name: str) -> float:
    """The value of an unlabelled metric on `/metrics`."""
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)
