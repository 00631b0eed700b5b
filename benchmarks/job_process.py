"""A benchmark's job in a fresh Python process, bounded in time: a hang or a crash costs the
job's limit, never the whole run, and each engine starts on a clean GPU.

    result, error = run_job(__file__, "--engine-worker", job, timeout_s, default=[])
    answer_job(args.engine_worker, engine_worker)     # in the worker process: the other side

runs `python <script> <flag> JOB.json OUT.json`; the script's worker reads the job from the
first file and writes its result (JSON) to the second, possibly several times as it goes.
Returns what OUT.json holds at the end (its last write, so rows a worker saved before a time
out are kept), or `default` if it wrote none, and None or a line saying why the job failed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run_job(script: str, flag: str, job: dict, timeout_s: float, default=None):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    out_file = Path(f.name + ".out")

    def written():
        return json.loads(out_file.read_text()) if out_file.exists() else default

    try:
        proc = subprocess.run([sys.executable, script, flag, f.name, str(out_file)],
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return written(), f"timed out after {timeout_s:.0f} s"
    if proc.returncode != 0:
        return written(), f"exit status {proc.returncode}"
    if not out_file.exists():
        return default, "the worker wrote no result"
    return written(), None


def answer_job(paths: list[str], worker) -> None:
    """The worker side of `run_job`: the job from paths[0], `worker(job)`'s result to
    paths[1]."""
    job = json.loads(Path(paths[0]).read_text())
    Path(paths[1]).write_text(json.dumps(worker(job)))
