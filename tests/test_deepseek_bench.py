"""The DeepSeek GPU benchmark's logic, at toy size on CPU: every section runs and records."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "bench_deepseek.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_deepseek", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_records_every_section(tmp_path, capsys):
    bench = _load_script()
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"kept": 1}))  # earlier results of other sections stay
    results = bench.main(["--tiny", "--device", "cpu", "--out", str(out), "--context", "40",
                          "--prefill-layouts", "1x2", "--decode-layouts", "2x2",
                          "--capacity-layouts", "2x2", "--batches", "1,3", "--steps", "2",
                          "--repeats", "1", "--warmup", "1", "--verify-capacity",
                          "--kv-cache-memory", "0.001"])
    assert json.loads(out.read_text()) == results and results["kept"] == 1
    (prefill,) = results["prefill"]
    assert (prefill["tp"], prefill["pcp"], prefill["context"]) == (1, 2, 40)
    assert prefill["ttft_s"] > 0 and len(prefill["runs_s"]) == 1
    assert [(r["dcp"], r["batch"]) for r in results["decode"]] == [(2, 1), (2, 3)]
    assert all(r["ms_per_step"] > 0 and len(r["steps_ms"]) == 2 for r in results["decode"])
    (capacity,) = results["capacity"]
    latent = bench.TINY["kv_lora_rank"] + bench.TINY["qk_rope_head_dim"]
    assert capacity["kv_bytes_per_token_per_rank"] == latent * bench.TINY["num_hidden_layers"] * 2
    # dcp = 2: one request's context is twice the tokens one rank holds.
    assert capacity["max_context_tokens"] == 2 * capacity["kv_tokens_per_rank"]
    assert capacity["verified_context"] == capacity["max_context_tokens"] - 1
    table = capsys.readouterr().out
    assert "TTFT" in table and "ms/token" in table and "max context" in table
