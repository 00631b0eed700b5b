"""The numbers of `cpserve bench serve`: per-request timings in, vLLM-style results out.

Timeline of one request, every instant read from `time.perf_counter()` on the client:

    sent        token chunk 1   token chunk 2   ...   token chunk n
     |--- TTFT ---|--- itl[0] ---|--- itl[1] ---| ... |
     |------------------------ E2EL -------------------|
    TPOT = (E2EL - TTFT) / (output_tokens - 1)        requests with more than one output token

`RequestOutput` holds those timings for one request; `calculate_metrics` aggregates them,
`format_result` prints the table `vllm bench serve` prints, `result_json` writes the result with
vLLM's JSON keys, and `save_plot` draws TTFT and ITL histograms as a PNG.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class RequestOutput:
    """What the client measured of one request; times in seconds, as drawn above."""

    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    generated_text: str = ""


def _percentile_key(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def calculate_metrics(outputs: Sequence[RequestOutput], duration: float,
                      percentiles: Sequence[float] = (99,)) -> dict[str, Any]:
    """Aggregate per-request timings (seconds) into totals, throughputs and ms statistics."""
    done = [o for o in outputs if o.success]
    total_input = sum(o.prompt_len for o in done)
    total_output = sum(o.output_tokens for o in done)
    per_second = 1.0 / duration if duration > 0 else 0.0
    metrics: dict[str, Any] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(outputs) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) * per_second,
        "output_throughput": total_output * per_second,
        "total_token_throughput": (total_input + total_output) * per_second,
    }
    samples = {
        "ttft": [o.ttft for o in done],
        "tpot": [(o.latency - o.ttft) / (o.output_tokens - 1) for o in done if o.output_tokens > 1],
        "itl": [gap for o in done for gap in o.itl],
        "e2el": [o.latency for o in done],
    }
    for name, seconds in samples.items():
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        empty = ms.size == 0
        metrics[f"mean_{name}_ms"] = 0.0 if empty else float(ms.mean())
        metrics[f"median_{name}_ms"] = 0.0 if empty else float(np.median(ms))
        metrics[f"std_{name}_ms"] = 0.0 if empty else float(ms.std())
        for p in percentiles:
            value = 0.0 if empty else float(np.percentile(ms, p))
            metrics[f"p{_percentile_key(p)}_{name}_ms"] = value
    metrics["input_lens"] = [o.prompt_len for o in outputs]
    metrics["output_lens"] = [o.output_tokens if o.success else 0 for o in outputs]
    metrics["ttfts"] = [o.ttft for o in outputs]
    metrics["itls"] = [o.itl for o in outputs]
    metrics["errors"] = [o.error for o in outputs]
    return metrics


_SECTIONS = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)


def format_result(result: dict[str, Any], percentiles: Sequence[float] = (99,)) -> str:
    """The table `vllm bench serve` prints, with the same labels, so scripts that read it work."""
    lines = ["{:=^50}".format(" Serving Benchmark Result ")]

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<40} {value:<10.2f}" if isinstance(value, float)
                     else f"{label:<40} {value:<10}")

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    if result.get("max_concurrency"):
        row("Maximum request concurrency:", result["max_concurrency"])
    if "request_rate" in result:
        row("Request rate configured (RPS):", float(result["request_rate"]))
    row("Benchmark duration (s):", result["duration"])
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Total Token throughput (tok/s):", result["total_token_throughput"])
    for key, short, title in _SECTIONS:
        lines.append(f"{title:-^50}")
        row(f"Mean {short} (ms):", result[f"mean_{key}_ms"])
        row(f"Median {short} (ms):", result[f"median_{key}_ms"])
        for p in percentiles:
            name = _percentile_key(p)
            row(f"P{name} {short} (ms):", result[f"p{name}_{key}_ms"])
    lines.append("=" * 50)
    return "\n".join(lines)


def save_plot(result: dict[str, Any], path: Path) -> None:
    """Histograms of TTFT and ITL of the successful requests, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ttfts = [t * 1000 for t, err in zip(result["ttfts"], result["errors"]) if not err]
    itls = [gap * 1000 for gaps, err in zip(result["itls"], result["errors"]) if not err
            for gap in gaps]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, values, title in ((axes[0], ttfts, "TTFT"), (axes[1], itls, "ITL")):
        ax.hist(values, bins=50)
        ax.set_title(f"{title} ({len(values)} samples)")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("count")
    fig.suptitle(f"{result['model']}  {result['endpoint']}  rate {result['request_rate']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def result_json(result: dict[str, Any]) -> str:
    """`result` as strict JSON, the file `--save-result` writes."""
    # Strict JSON has no Infinity; vLLM writes an unbounded rate as the string "inf".
    saved = dict(result, request_rate=result["request_rate"] if math.isfinite(
        result["request_rate"]) else "inf")
    return json.dumps(saved)
