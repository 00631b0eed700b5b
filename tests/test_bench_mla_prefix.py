"""benchmarks/bench_mla_prefix.py's logic at toy size on CPU: every phase runs and records, the
expanded phase reads prefixes expanded and the absorbed one does not."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "bench_mla_prefix.py"


def test_tiny_run_records_both_prefix_forms(tmp_path, monkeypatch):
    from cpserve.attention.backend import TorchReferenceBackend
    from cpserve.models import deepseek_v2

    spec = importlib.util.spec_from_file_location("bench_mla_prefix", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("CPSERVE_MLA_EXPANDED_MIN_TOKENS", "16")
    calls = []
    expanded = TorchReferenceBackend.latent_prefix_attention

    def counted(self, *a, **kw):
        calls.append(deepseek_v2.MLA_EXPANDED_PREFIX)
        return expanded(self, *a, **kw)

    monkeypatch.setattr(TorchReferenceBackend, "latent_prefix_attention", counted)
    result = bench.main(["--tiny", "--device", "cpu", "--context", "96", "--out-dir",
                         str(tmp_path)])
    written = json.loads((tmp_path / "mla-prefix.json").read_text())
    assert written["default_flags"] == {"max_num_batched_tokens": 64,
                                        "long_prefill_token_threshold": 32}
    for phase in ("one_step", "default_expanded", "default_absorbed"):
        assert written[phase]["ttft_s"] > 0, phase
    assert calls and all(calls)  # only the expanded phase, and it did read prefixes expanded
    assert deepseek_v2.MLA_EXPANDED_PREFIX and result["total_s"] > 0
