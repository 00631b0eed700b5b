"""Speculative decoding without a model: the config, n-gram lookup, the scheduler's handling
of drafts, and the exactness of verification (a chi-square test against the target
distribution). Milliseconds to a second each."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from cpserve.config import ConfigError, SchedulerConfig
from cpserve.engine.sampler import SampledToken, Sampler
from cpserve.engine.scheduler import Scheduler
from cpserve.kv.layout import KVLayout
from cpserve.kv.manager import KVCacheManager
from cpserve.request import Request, RequestStatus
from cpserve.sampling_params import SamplingParams
from cpserve.spec_decode import ngram
from cpserve.spec_decode.config import SpeculativeConfig, parse_speculative_config
from cpserve.spec_decode.drafter import draft_budget
from cpserve.spec_decode.metrics import SpecDecodeStats
from cpserve.spec_decode.ngram import NgramProposer, TokenHistory, find_drafts
from cpserve.spec_decode.rejection import accept, verification_rows
from tests.serve_startup import startup

MTP_HF = {"num_nextn_predict_layers": 1}


def parse(raw, hf=None):
    return parse_speculative_config(raw, ("tiny", "/models/tiny"), hf or {})


# Config ---------------------------------------------------------------------------------------
def test_vllm_json_maps_onto_the_config():
    assert parse({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}) == \
        SpeculativeConfig("ngram", 4, 3, 1)  # prompt_lookup_min defaults to 1
    assert parse({"method": "[ngram]", "num_speculative_tokens": 2}) == \
        SpeculativeConfig("ngram", 2, 5, 1)  # vLLM's window of 5 without prompt_lookup_max
    assert parse({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 7}) == \
        SpeculativeConfig("ngram", 2, 7, 7)
    for method in ("deepseek_mtp", "mtp"):
        assert parse({"method": method, "num_speculative_tokens": 3}, MTP_HF) == \
            SpeculativeConfig("mtp", 3)
    # vLLM's default for MTP: one draft per module; the served model may be named.
    assert parse({"method": "mtp", "model": "tiny"}, {"num_nextn_predict_layers": 2}) == \
        SpeculativeConfig("mtp", 2)
    assert parse(None) is None


@pytest.mark.parametrize(("raw", "message"), [
    ({"method": "eagle", "num_speculative_tokens": 3}, "method 'eagle' is not supported"),
    ({"num_speculative_tokens": 3}, "method None is not supported"),
    ({"method": "ngram"}, "needs num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens=0 must be"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens=True"),
    ({"method": "ngram", "num_speculative_tokens": 99}, "must be an integer in [1, 16]"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2,
      "prompt_lookup_min": 3}, "prompt_lookup_max=2 must be >= prompt_lookup_min=3"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0},
     "prompt_lookup_min=0 must be an integer >= 1"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1},
     "field(s) draft_tensor_parallel_size are not supported"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "tiny"},
     "a separate draft model is not supported"),
    ({"method": "mtp", "num_speculative_tokens": 2, "model": "other/model"},
     "model='other/model'"),
    ({"method": "mtp", "num_speculative_tokens": 2, "prompt_lookup_max": 3},
     "prompt_lookup_max is an n-gram setting"),
    ({"method": "mtp"}, "needs num_speculative_tokens"),  # no modules to count
    ("ngram", "must be a JSON object"),
])
def test_invalid_configs_are_refused_naming_the_field(raw, message):
    with pytest.raises(ConfigError, match="--speculative-config") as exc:
        parse(raw)
    assert message in str(exc.value)


@pytest.mark.parametrize(("spec", "message"), [
    ('{"method": "deepseek_mtp", "num_speculative_tokens": 3}',
     "method 'deepseek_mtp' needs a DeepSeek-V3 checkpoint with multi-token prediction "
     "modules; LlamaForCausalLM has none"),
    ('{"method": "ngram", "num_speculative_tokens": 8}',
     "a verification step computes 9 tokens per request, more than "
     "--max-num-batched-tokens=4"),
    ("{bad json", "argument --speculative-config: not valid JSON"),
])
def test_start_up_refuses_what_the_model_or_budget_cannot_honour(monkeypatch, capsys, spec,
                                                                 message):
    result = startup(["tiny", "--speculative-config", spec, "--max-num-batched-tokens", "4",
                      "--max-num-seqs", "4"], monkeypatch, capsys)
    assert result.code == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_the_flag_reaches_the_engine_config(monkeypatch, capsys):
    result = startup(["tiny", "--speculative_config",
                      '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4,'
                      ' "prompt_lookup_min": 2}'], monkeypatch, capsys)
    assert result.role == "server", result.stderr
    assert result.config.speculative == SpeculativeConfig("ngram", 3, 4, 2)


NGRAM_FLAG = '{"method": "ngram", "num_speculative_tokens": 2}'
KV_BOTH_FLAG = '{"kv_connector": "CpserveConnector", "kv_role": "kv_both"}'


@pytest.mark.parametrize("flags", [["--speculative-config", NGRAM_FLAG],
                                   ["--kv-transfer-config", KV_BOTH_FLAG],
                                   ["--speculative-config", NGRAM_FLAG,
                                    "--kv-transfer-config", KV_BOTH_FLAG]])
def test_speculation_and_kv_transfer_run_with_synchronous_steps(monkeypatch, capsys, caplog,
                                                                flags):
    """Either feature: async scheduling is off unless asked for; asked for explicitly, the
    start-up refuses naming both flags; on CUDA (where it is on by default) it is turned off
    and logged."""
    import logging

    from cpserve.engine.args import EngineArgs

    result = startup(["tiny", *flags], monkeypatch, capsys)
    assert result.role == "server", result.stderr
    assert not result.config.scheduler.async_scheduling
    result = startup(["tiny", *flags, "--no-async-scheduling"], monkeypatch, capsys)
    assert result.role == "server" and not result.config.scheduler.async_scheduling
    result = startup(["tiny", *flags, "--async-scheduling"], monkeypatch, capsys)
    assert result.code == 2 and "Traceback" not in result.stderr
    named = [f for f in flags if f.startswith("--")]
    assert all(flag in result.stderr for flag in ["--async-scheduling", *named]), result.stderr
    args = EngineArgs("tiny", speculative_config={"method": "ngram"} if
                      "--speculative-config" in flags else None,
                      kv_transfer_config={} if "--kv-transfer-config" in flags else None)
    with caplog.at_level(logging.INFO, logger="cpserve.engine.args"):
        assert args._async_scheduling("cuda") is False
    assert "async scheduling is off" in caplog.text and named[0] in caplog.text
    assert EngineArgs("tiny")._async_scheduling("cuda") is True  # without either: on


# N-gram lookup ----------------------------------------------------------------------------
def brute_force_drafts(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The rule, one comparison at a time: longest suffix first, latest earlier occurrence."""
    total = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        if n >= total:
            continue
        suffix = tokens[total - n:]
        for end in range(total - 2, n - 2, -1):  # end of an earlier occurrence
            if tokens[end - n + 1:end + 1] == suffix:
                return tokens[end + 1:end + 1 + k]
    return []


def test_drafts_follow_the_latest_earlier_occurrence_of_the_longest_suffix():
    t = np.array([7, 1, 2, 0, 1, 2, 7, 1, 2])
    assert find_drafts(t, 1, 2, 3).tolist() == [7, 1, 2]  # "1 2" last seen ending at 5
    assert find_drafts(t, 1, 3, 3).tolist() == [0, 1, 2]  # "7 1 2" seen ending at 2
    assert find_drafts(t, 4, 5, 3).tolist() == []  # no 4-gram repeats
    assert find_drafts(np.array([5, 5, 5, 5]), 1, 3, 4).tolist() == [5]  # what follows exists
    assert find_drafts(np.array([3]), 1, 3, 2).tolist() == []


@pytest.mark.parametrize("dense", [False, True], ids=["candidates", "mask"])
def test_vectorised_lookup_matches_the_rule_on_random_contexts(dense, monkeypatch):
    monkeypatch.setattr(ngram, "DENSE_CANDIDATES", -1 if dense else 10**9)
    gen = np.random.default_rng(0)
    for case in range(400):
        tokens = gen.integers(0, 3 + case % 5, size=int(gen.integers(1, 40))).tolist()
        min_n = int(gen.integers(1, 4))
        max_n = min_n + int(gen.integers(0, 3))
        k = int(gen.integers(1, 5))
        assert find_drafts(np.array(tokens), min_n, max_n, k).tolist() == \
            brute_force_drafts(tokens, min_n, max_n, k), (tokens, min_n, max_n, k)


def test_token_history_grows_and_copies_only_new_tokens():
    history = TokenHistory()
    tokens = list(range(300))
    assert history.sync(tokens[:10]).tolist() == tokens[:10]
    assert history.sync(tokens).tolist() == tokens  # past the first buffer of 256
    history.buffer[0] = -1  # only new tokens are copied: the old ones are not read again
    assert history.sync(tokens + [5]).tolist()[:2] == [-1, 1]


def test_proposer_restarts_a_recomputed_request():
    proposer = NgramProposer(3, 1, 2)
    r = Request("a", [1, 2, 3, 1, 2], SamplingParams())
    assert proposer.propose(r, 3) == [3, 1, 2]
    assert proposer.propose(r, 1) == [3]  # capped by what the step may verify
    other = Request("a", [4, 4], SamplingParams())  # same id, shorter: a fresh history
    assert proposer.propose(other, 3) == [4]


# Verification ----------------------------------------------------------------------------
def _tokens(ids: list[int]) -> list[SampledToken]:
    return [SampledToken(t, -1.0, None) for t in ids]


def test_accept_keeps_the_agreeing_prefix_and_the_token_after():
    assert [t.token_id for t in accept([5, 6, 7], _tokens([5, 6, 9, 1]))] == [5, 6, 9]
    assert [t.token_id for t in accept([5, 6, 7], _tokens([5, 6, 7, 1]))] == [5, 6, 7, 1]
    assert [t.token_id for t in accept([5, 6, 7], _tokens([4, 6, 7, 1]))] == [4]
    assert [t.token_id for t in accept([], _tokens([3]))] == [3]


def test_rows_see_the_drafts_as_generated_tokens():
    r = Request("a", [1, 2], SamplingParams(min_tokens=2, repetition_penalty=1.5))
    r.append_token(3)
    rows = verification_rows(r, [4, 5])
    assert [list(row.output_token_ids) for row in rows] == [[3], [3, 4], [3, 4, 5]]
    assert [len(row.output_token_ids) for row in rows] == [1, 2, 3]


def test_stats_count_drafts_as_vllm_does():
    stats = SpecDecodeStats(3)
    stats.observe(3, 2)
    stats.observe(2, 0)
    stats.observe(0, 0)  # no drafts: not a draft
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (2, 5, 2)
    assert stats.accepted_per_position == [1, 1, 0]
    assert stats.mean_accepted_length == 2.0


# A context-dependent toy target on 4 tokens: logits from the last two tokens.
VOCAB, PROMPT = 4, [0, 1]
_TABLE = torch.randn(VOCAB, VOCAB, VOCAB, generator=torch.Generator().manual_seed(3)) * 1.5
TOY = SamplingParams(temperature=0.8, top_k=3, repetition_penalty=1.3, max_tokens=3)


def toy_logits(context: list[int]) -> torch.Tensor:
    return _TABLE[context[-2], context[-1]].clone()


def toy_target(context: list[int]) -> torch.Tensor:
    """The sampling distribution, written out independently of the sampler: repetition
    penalty on every token seen, temperature, top-k."""
    logits = toy_logits(context)
    for t in set(context):
        logits[t] = logits[t] / TOY.repetition_penalty if logits[t] > 0 \
            else logits[t] * TOY.repetition_penalty
    logits = logits / TOY.temperature
    kth = logits.sort(descending=True).values[TOY.top_k - 1]
    return logits.masked_fill(logits < kth, float("-inf")).softmax(-1)


def toy_drafts(contexts: list[list[int]], k: int) -> list[list[int]]:
    """A deterministic drafter that is often right: the most likely next token, raw."""
    last2 = torch.tensor([c[-2:] for c in contexts])
    drafts = []
    for _ in range(k):
        draft = _TABLE[last2[:, 0], last2[:, 1]].argmax(-1)
        drafts.append(draft)
        last2 = torch.stack([last2[:, 1], draft], 1)
    return torch.stack(drafts, 1).tolist()


def rows_logits(contexts: list[list[int]], drafts: list[list[int]]) -> torch.Tensor:
    """toy_logits of every verification row: row j after context + drafts[:j]."""
    pairs = [(c + d)[len(c) + j - 2:len(c) + j] for c, d in zip(contexts, drafts)
             for j in range(len(d) + 1)]
    index = torch.tensor(pairs)
    return _TABLE[index[:, 0], index[:, 1]]


def test_verification_samples_exactly_the_target_distribution():
    """6,000 requests generate 3 tokens each with 3 drafts a step (most accepted, some
    not); the frequency of each 3-token sequence must fit the target's probability.
    Chi-square goodness of fit over the 64 sequences (those expected fewer than 5 times
    pooled); the seeds are fixed, so the outcome is too."""
    trials = 6_000
    sampler = Sampler(seed=11)
    requests = [Request(str(i), PROMPT, TOY) for i in range(trials)]
    accepted_some = 0
    while True:
        active = [r for r in requests if len(r.output_token_ids) < 3]
        if not active:
            break
        contexts = [r.all_token_ids for r in active]
        drafts = toy_drafts(contexts, 3)
        rows = [row for r, d in zip(active, drafts) for row in verification_rows(r, d)]
        sampled = sampler(rows_logits(contexts, drafts), rows)
        first = 0
        for r, d in zip(active, drafts):
            tokens = accept(d, sampled[first:first + len(d) + 1])
            first += len(d) + 1
            accepted_some += len(tokens) > 1
            for t in tokens[:3 - len(r.output_token_ids)]:
                r.append_token(t.token_id)
    assert accepted_some > trials // 2  # the drafts matter: most steps accept some

    counts = {}
    for r in requests:
        key = tuple(r.output_token_ids)
        counts[key] = counts.get(key, 0) + 1
    expected = {}
    for seq in itertools.product(range(VOCAB), repeat=3):
        p, context = 1.0, list(PROMPT)
        for t in seq:
            p *= float(toy_target(context)[t])
            context.append(t)
        expected[seq] = p * trials
    assert set(counts) <= {s for s, e in expected.items() if e > 0}  # top-k respected
    statistic, dof = _chi_square([counts.get(s, 0) for s in expected], list(expected.values()))
    assert _chi_square_sf(statistic, dof) > 1e-3, (statistic, dof)


def test_greedy_verification_accepts_while_drafts_equal_the_argmax():
    sampler = Sampler(seed=0)
    r = Request("g", PROMPT, SamplingParams(temperature=0, max_tokens=8))
    drafts = toy_drafts([r.all_token_ids], 3)[0]
    drafts[2] = (drafts[2] + 1) % VOCAB  # the third draft is wrong
    logits = rows_logits([r.all_token_ids], [drafts])
    tokens = [t.token_id for t in accept(drafts, sampler(logits, verification_rows(r, drafts)))]
    assert tokens == drafts[:2] + [int(logits[2].argmax())]


def _chi_square(observed: list[int], expected: list[float]) -> tuple[float, int]:
    """Pearson's statistic, cells expected fewer than 5 times pooled into one."""
    obs, exp, pooled_obs, pooled_exp = [], [], 0, 0.0
    for o, e in zip(observed, expected):
        if e < 5:
            pooled_obs, pooled_exp = pooled_obs + o, pooled_exp + e
        else:
            obs.append(o)
            exp.append(e)
    if pooled_exp > 0:
        obs.append(pooled_obs)
        exp.append(pooled_exp)
    return sum((o - e) ** 2 / e for o, e in zip(obs, exp)), len(obs) - 1


def _chi_square_sf(statistic: float, dof: int) -> float:
    """P(chi2_dof >= statistic): the regularized upper incomplete gamma Q(dof/2, x/2)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def test_chi_square_helper_matches_known_quantiles():
    assert math.isclose(_chi_square_sf(3.841, 1), 0.05, rel_tol=1e-3)
    assert math.isclose(_chi_square_sf(18.307, 10), 0.05, rel_tol=1e-3)


# The scheduler with drafts -----------------------------------------------------------------
def make_scheduler(num_blocks=64, max_tokens=32, lookahead=0, max_model_len=64) -> Scheduler:
    kv = KVCacheManager(KVLayout(4, 1), num_blocks, True, salt=b"t")
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=max_tokens), kv,
                     lookahead, max_model_len)


def test_drafts_are_scheduled_after_the_last_token_and_count_once_accepted():
    s = make_scheduler()
    r = Request("a", list(range(10, 16)), SamplingParams(max_tokens=20))
    s.add_request(r)
    out = s.schedule()
    s.update_after_step(out)
    r.append_token(50)
    r.spec_token_ids = [51, 52, 53]
    out = s.schedule()
    (item,) = out.scheduled
    assert (item.num_new_tokens, item.draft_token_ids, item.completes) == (4, [51, 52, 53], True)
    assert item.token_ids == [50, 51, 52, 53] and item.start_pos == 6
    s.update_after_step(out)
    assert r.num_computed_tokens == 7  # the drafts are not computed tokens yet
    for token in (51, 52, 99):  # two accepted, then the target's own token
        r.append_token(token)
    s.commit_accepted(r)
    assert (r.num_tokens, r.num_computed_tokens) == (10, 9)
    s.kv.check_integrity()


def test_the_budget_cuts_drafts_short_and_preemption_drops_them():
    s = make_scheduler(max_tokens=3)
    r = Request("a", [1, 2], SamplingParams(max_tokens=20))
    s.add_request(r)
    s.update_after_step(s.schedule())
    r.append_token(3)
    r.spec_token_ids = [4, 5, 6]
    (item,) = s.schedule().scheduled
    assert item.draft_token_ids == [4, 5] and item.completes
    s.finish(r, RequestStatus.FINISHED_ABORTED)
    r2 = Request("b", [1, 2], SamplingParams())
    r2.spec_token_ids = [7]
    r2.preempt()
    assert r2.spec_token_ids == []


def test_mtp_lookahead_allocates_the_drafting_chain_but_not_past_max_model_len():
    s = make_scheduler(lookahead=3, max_model_len=12)
    r = Request("a", list(range(6)), SamplingParams(max_tokens=20))
    s.add_request(r)
    s.schedule()
    assert len(s.kv.block_table("a")) == 3  # 6 tokens + 3 lookahead = 9 slots: 3 blocks
    r2 = Request("b", list(range(10)), SamplingParams(max_tokens=20))
    s.add_request(r2)
    s.schedule()
    assert len(s.kv.block_table("b")) == 3  # 10 + 2 (capped at max_model_len 12)


def test_draft_budget_stops_at_max_model_len_and_max_tokens():
    r = Request("a", list(range(10)), SamplingParams(max_tokens=5))
    assert draft_budget(r, 4, max_model_len=100) == 4
    assert draft_budget(r, 4, max_model_len=12) == 2  # verifies positions 9..11
    r.append_token(1)
    r.append_token(1)
    assert draft_budget(r, 4, max_model_len=100) == 2  # 3 more tokens at most
    r.status = RequestStatus.FINISHED_STOPPED
    assert draft_budget(r, 4, max_model_len=100) == 0
