"""Engine paths around the KV cache: sharded checkpoints, preemption with prefix caching."""

from __future__ import annotations

import json

from cpserve import LLM, SamplingParams
from tests.checkpoints import (
    TOKENIZER_FILES,
    hf_greedy,
    load_hf_model,
    make_checkpoint,
    random_prompts,
)


def test_sharded_checkpoint_with_index_file(tmp_path):
    path = make_checkpoint(tmp_path / "one", "qwen2")
    model = load_hf_model(path)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    for name in TOKENIZER_FILES:
        (sharded / name).write_bytes((path / name).read_bytes())
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really several files

    prompts = random_prompts([5, 21])
    reference = hf_greedy(model, prompts, 8)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(str(sharded), num_kv_blocks=64, max_model_len=512) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [tokens for tokens, _ in reference]


def test_preemption_with_prefix_caching_keeps_tokens_and_cache_consistent():
    doc = random_prompts([40], seed=3)[0]
    prompts = [doc + q for q in random_prompts([3, 5, 7, 9], seed=4)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    def run(**kwargs):
        with LLM("tiny", block_size=4, max_num_batched_tokens=32, seed=0, max_model_len=160,
                 **kwargs) as llm:
            outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                   use_tqdm=False)
            engine = llm.engine
            engine.check_integrity()
            assert engine.kv.pool.num_free == engine.kv.pool.num_blocks
            return [o.outputs[0].token_ids for o in outputs], engine.stats()

    expected, _ = run(num_kv_blocks=512, enable_prefix_caching=False)
    # 4 requests of about 70 tokens need about 72 blocks of 4: 40 blocks force preemptions.
    got, stats = run(num_kv_blocks=40, enable_prefix_caching=True)
    assert stats.num_preemptions_total > 0
    assert stats.prefix_cache_hits_total > 0
    assert got == expected
