"""benchmarks/bench_serving.py end to end at the tiny scale (`--smoke`, CPU): the real engine
through the `LLM` API, the tokenizer with the model's exact vocabulary, the transformers
baseline, and the JSON the device runs write."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_serving  # noqa: E402
from serving_model import TINY, build_tokenizer  # noqa: E402

RUN_KEYS = {"name", "num_prompts", "prompt_tokens", "output_tokens", "concurrency",
            "max_num_batched_tokens", "tp", "pcp", "dcp", "ttft_s_median", "ttft_s_max",
            "tpot_ms_median", "wall_s", "output_tok_per_s", "total_tok_per_s"}


def test_tokenizer_has_exactly_the_model_vocabulary():
    tok = build_tokenizer(TINY["vocab_size"], TINY["bos_token_id"], TINY["eos_token_id"])
    assert tok.get_vocab_size(with_added_tokens=True) == TINY["vocab_size"]
    texts = [tok.decode([i], skip_special_tokens=False) for i in range(TINY["vocab_size"])]
    assert all(texts)  # every id the model can sample decodes to some text
    assert texts[TINY["eos_token_id"]] == "<|end_of_text|>"


def test_smoke_run_writes_the_issue_json(tmp_path):
    out = bench_serving.main(["--smoke", "--runs", "long-32k,prefix-128k", "--hf",
                              "--out-dir", str(tmp_path)])
    report = json.loads(out.read_text())
    assert out.name == f"{report['date']}-cpu-serving.json"
    assert {"device", "date", "torch", "model", "runs", "hf_prefill"} <= set(report)
    assert not report["errors"]
    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) == {"long-32k", "prefix-128k"}
    for run in runs.values():
        assert RUN_KEYS <= set(run)
        assert 0 < run["ttft_s_median"] <= run["ttft_s_max"] < run["wall_s"] + 1e-6
        assert run["tpot_ms_median"] > 0 and run["output_tok_per_s"] > 0
        assert (run["tp"], run["pcp"], run["dcp"]) == (1, 1, 1)
    spec = bench_serving.smoke(bench_serving.RUNS["prefix-128k"])
    assert runs["prefix-128k"]["cached_tokens"] >= spec.cached_tokens > 0  # a real hit
    # Default flags, scaled: chunked, each long prompt capped at half the budget.
    assert runs["long-32k"]["long_prefill_token_threshold"] == (
        runs["long-32k"]["max_num_batched_tokens"] // 2)
    assert [h["tokens"] for h in report["hf_prefill"]] == [
        t // bench_serving.SMOKE_TOKENS for t in bench_serving.HF_TOKENS]
    assert all(h["ttft_s"] > 0 for h in report["hf_prefill"])


def test_smoke_throughput_runs_through_the_server_and_the_offline_api(tmp_path):
    """Issue 19's runs at the tiny scale: a real `cpserve serve` started by the script (same
    interpreter), loaded by `cpserve bench serve`'s client, and the same prompts offline."""
    out = bench_serving.main(["--smoke", "--runs", "64x1k,64x1k-llm", "--out-dir",
                              str(tmp_path)])
    report = json.loads(out.read_text())
    assert not report["errors"]
    runs = {r["name"]: r for r in report["runs"]}
    assert {(n, r["via"]) for n, r in runs.items()} == {("64x1k", "server"), ("64x1k-llm", "llm")}
    spec = bench_serving.smoke(bench_serving.RUNS["64x1k"])
    for run in runs.values():
        assert RUN_KEYS <= set(run) and run["failed"] == 0
        assert run["total_output_tokens"] == spec.num_prompts * spec.output_tokens
        assert run["total_prompt_tokens"] == spec.num_prompts * spec.prompt_tokens
        assert 0 < run["ttft_s_median"] <= run["ttft_s_max"] <= run["wall_s"]
        assert run["output_tok_per_s"] > 0
        # A stream whose tokens all came in its first chunk (a loaded 2-core machine lets the
        # front end coalesce deltas) has no inter-token gaps: its TPOT is 0, not missing.
        assert run["tpot_ms_median"] is not None and run["tpot_ms_median"] >= 0
    assert (tmp_path / "server-64x1k.log").exists()  # the server's log, kept
