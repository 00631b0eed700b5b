"""The soak script's CI length: about a minute of mixed traffic with hang-ups and refusals on
a real loopback server, then no leaked KV block, bounded memory growth, and every greedy
answer equal to the reference run (`benchmarks/soak.py` says what is checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


def test_soak_one_minute(tmp_path):
    done = subprocess.run([sys.executable, str(SOAK), "--duration", "40", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert (tmp_path / "soak.json").exists(), done.stderr[-3000:]
    result = json.loads((tmp_path / "soak.json").read_text())
    assert done.returncode == 0 and not result["failures"], result
    counts = result["counts"]
    assert counts["greedy"] == counts.get("match", 0) + counts.get("near_tie", 0) > 50
    assert all(counts.get(kind, 0) > 0 for kind in ("hangup_stream", "hangup_wait",
                                                    "oversize_body", "long_prompt"))
    assert result["kv_blocks_in_use"] == 0 and result["integrity"] == "ok"
    assert result["rss_growth"] < 0.05
