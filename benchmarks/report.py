"""Results of bench_long_context.py: the table it prints, its JSON, PNG and RESULTS.md section."""

from __future__ import annotations

import json
from pathlib import Path

TARGETS = """| target (issue 5) | measured | verdict |
| --- | --- | --- |
"""


def _ttft(rows: list[dict], tokens: int, **match) -> float | None:
    for r in rows:
        if r["tokens"] == tokens and all(r.get(k) == v for k, v in match.items()):
            return r["ttft_s"]
    return None


def _tpot(rows: list[dict], context: int, batch: int, **match) -> float | None:
    for r in rows:
        if r["context"] == context and r["batch"] == batch and all(
                r.get(k) == v for k, v in match.items()):
            return r["tpot_ms"]
    return None


def targets(res: dict) -> list[tuple[str, str, str]]:
    """(target, measured, met?) for each row of the issue's table that the run covers."""
    rows = []
    pre, hf = res["prefill"], res["hf_prefill"]

    def speedup(tokens: int, goal: float, label: str) -> None:
        one, two = _ttft(pre, tokens, pcp=1), _ttft(pre, tokens, pcp=2, exchange="allgather")
        if one and two:
            rows.append((label, f"{one:.2f} s / {two:.2f} s = {one / two:.2f}x",
                         "met" if one / two >= goal else "NOT met"))

    longest = max((r["tokens"] for r in pre), default=0)
    speedup(131072, 1.9, "prefill 128k, pcp 2 vs pcp 1 >= 1.9x")
    speedup(32768, 1.6, "prefill 32k, pcp 2 vs pcp 1 >= 1.6x")
    ours, theirs = _ttft(pre, longest, pcp=1), _ttft(hf, longest)
    if ours and theirs:
        rows.append((f"prefill {longest} on one GPU no slower than HF",
                     f"{ours:.2f} s vs HF {theirs:.2f} s",
                     "met" if ours <= theirs else "NOT met"))
    dec = res["decode"]
    ms = _tpot(dec, 32768, 1, dcp=1, tp=1, graphs=True)
    if ms:
        hf_ms = _tpot(res["hf_decode"], 32768, 1)
        rows.append(("decode batch 1, 32k, one GPU <= 6.5 ms",
                     f"{ms:.2f} ms" + (f" (HF {hf_ms:.1f} ms)" if hf_ms else ""),
                     "met" if ms <= 6.5 else "NOT met"))
    cap = {c["dcp"]: c["tokens"] for c in res["capacity"]}  # same KV memory per rank
    if 1 in cap and 2 in cap:
        rows.append(("DCP 2 KV capacity exactly 2x", f"{cap[2]} / {cap[1]} tokens = "
                     f"{cap[2] / cap[1]:.3f}x", "met" if cap[2] == 2 * cap[1] else "NOT met"))
    for r in dec:
        if r["dcp"] == 2 and r["batch"] == 8:
            base = _tpot(dec, r["context"], 8, dcp=1, tp=2, graphs=r["graphs"])
            if base:
                cut = 1 - r["tpot_ms"] / base
                mode = "CUDA graphs" if r["graphs"] else "eager"
                rows.append((f"DCP 2 vs 1, batch 8, context {r['context']} ({mode}): >= 30% "
                             "lower",
                             f"{base:.2f} -> {r['tpot_ms']:.2f} ms ({cut:.0%} lower)",
                             "met" if cut >= 0.3 else "NOT met"))
    return rows


def table(res: dict) -> str:
    lines = [f"device {res['device']} x{res['gpus']}, {res['date']}, torch {res['torch']}, "
             f"triton {res['triton']}, {res['layers']} layers" + (" (quick)" if res["quick"]
                                                                  else ""),
             "", "| prefill tokens | pcp 1 (s) | pcp 2 all-gather (s) | pcp 2 ring (s) | "
             "HF (s) |", "| --- | --- | --- | --- | --- |"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for tokens in sorted({r["tokens"] for r in res["prefill"] + res["hf_prefill"]}):
        lines.append(f"| {tokens} | {fmt(_ttft(res['prefill'], tokens, pcp=1))} | "
                     f"{fmt(_ttft(res['prefill'], tokens, pcp=2, exchange='allgather'))} | "
                     f"{fmt(_ttft(res['prefill'], tokens, pcp=2, exchange='ring'))} | "
                     f"{fmt(_ttft(res['hf_prefill'], tokens))} |")
    lines += ["", "| decode context | batch | tp | dcp | KV heads | CUDA graphs | ms / token |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["decode"]:
        lines.append(f"| {r['context']} | {r['batch']} | {r['tp']} | {r['dcp']} | "
                     f"{r['kv_heads']} | {'yes' if r['graphs'] else 'no'} | {r['tpot_ms']:.2f} |")
    for r in res["hf_decode"]:
        lines.append(f"| {r['context']} | {r['batch']} | HF | - | 8 | no | {r['tpot_ms']:.2f} |")
    lines += ["", TARGETS.rstrip()]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in targets(res)]
    for p in res.get("prefill_profile", []):
        parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(p["gpu_ms_by_class"].items(),
                                                            key=lambda kv: -kv[1]))
        lines.append(f"\nprefill {p['tokens']} pcp {p['pcp']}: wall {p['wall_ms']:.0f} ms; GPU ms "
                     f"by kernel class: {parts}")
    prof = res.get("profile")
    if prof:
        lines.append(f"\ndecode profile (eager, {prof['gpu_ms_per_step']:.2f} GPU ms per step), "
                     "top kernels: " + "; ".join(f"{k['name'][:40]} {k['ms_per_step']:.2f} ms "
                                                 f"x{k['calls_per_step']:.0f}"
                                                 for k in prof["kernels"][:8]))
    lines += ["", "phases: " + ", ".join(f"{k} {v['status']} ({v['seconds']} s)"
                                         for k, v in res["phases"].items())]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, rows in (("cpserve pcp 1", [r for r in res["prefill"] if r["pcp"] == 1]),
                        ("cpserve pcp 2", [r for r in res["prefill"]
                                           if r["pcp"] == 2 and r["exchange"] == "allgather"]),
                        ("HF transformers", res["hf_prefill"])):
        if rows:
            a.plot([r["tokens"] for r in rows], [r["ttft_s"] for r in rows], "o-", label=label)
    a.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="TTFT (s)",
          title="prefill")
    a.legend()
    groups: dict = {}
    for r in res["decode"]:
        key = f"tp{r['tp']} dcp{r['dcp']} batch {r['batch']}" + ("" if r["graphs"] else " eager")
        groups.setdefault(key, []).append(r)
    for key, rows in groups.items():
        rows.sort(key=lambda r: r["context"])
        b.plot([r["context"] for r in rows], [r["tpot_ms"] for r in rows], "o-", label=key)
    for r in res["hf_decode"]:
        b.plot([r["context"]], [r["tpot_ms"]], "k*", label=f"HF batch {r['batch']}")
    b.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="ms / token",
          title="decode")
    b.legend(fontsize=7)
    fig.suptitle(f"{res['device']} x{res['gpus']}, {res['date']}, torch {res['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(res: dict, out_dir: Path) -> None:
    stem = f"{res['date']}-{res['device'].replace(' ', '-')}" + ("-quick" if res["quick"] else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1))
    text = table(res)
    print(text, flush=True)
    (out_dir / f"{stem}.md").write_text(f"## {stem}\n\n{text}\n")
    try:
        plot(res, out_dir / f"{stem}.png")
    except Exception as exc:  # noqa: BLE001 - the numbers matter more than the picture
        print(f"plot failed: {exc}", flush=True)
