"""The offline API in a plain script, as a user pastes it: no `if __name__ == "__main__":`
guard, several ranks. The ranks are fresh interpreters, so the script does not run again in
them (with multiprocessing's spawn it did, and the driver died after 25 s of waiting)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json
    from cpserve import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = []
    for tp in (1, 2):
        with LLM("tiny", tensor_parallel_size=tp, max_model_len=256, num_kv_blocks=64) as llm:
            tokens.append(llm.generate("a plain script", params, use_tqdm=False)[0]
                          .outputs[0].token_ids)
    print("TOKENS", json.dumps(tokens))
""")


def test_a_script_without_a_main_guard_runs_on_several_ranks(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "CPSERVE_DIST_TIMEOUT": "20"})
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("TOKENS ")]
    single, two_ranks = json.loads(line[len("TOKENS "):])
    assert len(single) == 8 and two_ranks == single
