"""The MoE / MLA device benchmark's logic, at toy size on CPU (kernels in Triton's
interpreter): every section runs, decides and records."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "bench_moe.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_moe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_decides_and_records(tmp_path, capsys, monkeypatch):
    from cpserve.models import deepseek_v2
    from cpserve.models.kernels import fused_moe

    bench = _load_script()
    # The run applies its decisions to the module constants: put them back afterwards.
    for module, name in ((fused_moe, "SORTED_CONFIG"), (fused_moe, "SORTED_SMALL_CONFIG"),
                         (fused_moe, "BY_EXPERT_CONFIG"),
                         (fused_moe, "BY_EXPERT_MAX_PAIRS"),
                         (deepseek_v2, "MLA_EXPANDED_MIN_TOKENS")):
        monkeypatch.setattr(module, name, getattr(module, name))
    results = bench.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--models",
                          "qwen3moe", "--steps", "2", "--repeats", "1"])
    assert json.loads((tmp_path / "bench_moe.json").read_text())["summary"] == results["summary"]
    moe = results["moe"]
    assert {r["tokens"] for r in moe["rows"]} == {1, 4}
    for row in moe["rows"]:  # every implementation ran and agreed with the reference
        assert all(ms is not None for ms in row["ms"].values()), row
        assert max(row["max_rel_err"].values()) < 1e-4
    assert moe["decisions"]["CUDA_EXPERTS"] == "triton"
    assert fused_moe.BY_EXPERT_MAX_PAIRS == moe["decisions"]["BY_EXPERT_MAX_PAIRS"]  # applied
    mla = results["mla"]
    assert [r["tokens"] for r in mla["rows"]] == [8, 16, 32]
    assert all(r["absorbed_ms"] > 0 and r["expanded_ms"] > 0 for r in mla["rows"])
    assert deepseek_v2.MLA_EXPANDED_MIN_TOKENS == mla["decisions"]["MLA_EXPANDED_MIN_TOKENS"]
    engine = results["engine"]["qwen3moe"]
    assert engine["ttft_s"] > 0 and len(engine["ttft_runs_s"]) == 2
    for batch in (1, 2):
        assert engine[f"decode_ms_{batch}"] > 0 and len(engine[f"decode_steps_ms_{batch}"]) == 2
    assert engine["profile"]["prefill"]["top"] and engine["profile"]["decode"]["batch"] == 2
    assert engine["ttft_chunked_s"] > 0 and engine["chunk_tokens"] == 16
    out = capsys.readouterr().out
    assert "qwen3moe  ttft_s" in out and "mla decisions" in out
