"""Sampler tests: exact support of each filter, seeded reproducibility, logprobs and ranks.

Run on CPU always and on CUDA when one is present (the generator must follow the device).
"""

from __future__ import annotations

import math

import pytest
import torch

from cpserve.engine.logprobs import top_ids as _top_ids
from cpserve.engine.sampler import (
    Sampler,
    SamplingRow,
    make_generator,
    prompt_logprobs,
    support_mask,
)
from cpserve.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def kept_set(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> set[int]:
    """The support of one row, through the public mask function."""
    logits = torch.as_tensor(logits, dtype=torch.float32).unsqueeze(0)
    mask = support_mask(logits, [temperature], [top_k], [top_p], [min_p])
    return set(mask[0].nonzero().flatten().tolist())


def log_probs(*probs: float) -> list[float]:
    return [math.log(p) for p in probs]


def row(params: SamplingParams, device="cpu", output=None) -> SamplingRow:
    generator = None if params.seed is None else make_generator(params.seed, device)
    return SamplingRow(params=params, generator=generator, output_token_ids=list(output or []))


def draw_many(logits_row, params_kwargs, num_draws, device="cpu") -> list[int]:
    """Sample one row num_draws times, each with its own seed, all in one batch."""
    logits = torch.as_tensor(logits_row, dtype=torch.float32, device=device)
    batch = logits.unsqueeze(0).repeat(num_draws, 1)
    rows = [row(SamplingParams(seed=s, **params_kwargs), device) for s in range(num_draws)]
    return [t.token_id for t in Sampler(seed=0)(batch, rows)]


# ---------------------------------------------------------------- exact support of the filters


def test_top_k_keeps_k_most_likely():
    logits = [0.5, 3.0, -1.0, 2.0, 1.0]
    assert kept_set(logits, top_k=1) == {1}
    assert kept_set(logits, top_k=2) == {1, 3}
    assert kept_set(logits, top_k=3) == {1, 3, 4}
    assert kept_set(logits, top_k=5) == {0, 1, 2, 3, 4}
    assert kept_set(logits, top_k=0) == kept_set(logits, top_k=-1) == {0, 1, 2, 3, 4}
    assert kept_set(logits, top_k=100) == {0, 1, 2, 3, 4}


def test_top_k_keeps_all_ties_at_the_boundary():
    # Sorted: 3, 2, 2, 1, 0. The 2nd and 3rd largest are equal: k=2 keeps both.
    logits = [3.0, 1.0, 2.0, 2.0, 0.0]
    assert kept_set(logits, top_k=2) == {0, 2, 3}
    assert kept_set(logits, top_k=3) == {0, 2, 3}
    assert kept_set(logits, top_k=4) == {0, 1, 2, 3}
    # All equal: every token ties with the k-th.
    assert kept_set([1.0] * 6, top_k=1) == set(range(6))


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = log_probs(0.1, 0.4, 0.2, 0.3)  # order by probability: 1, 3, 2, 0
    assert kept_set(logits, top_p=0.3) == {1}  # 0.4 reaches 0.3
    assert kept_set(logits, top_p=0.5) == {1, 3}  # 0.4 < 0.5 <= 0.7
    assert kept_set(logits, top_p=0.65) == {1, 3}
    assert kept_set(logits, top_p=0.75) == {1, 3, 2}  # 0.7 < 0.75 <= 0.9
    assert kept_set(logits, top_p=0.95) == {0, 1, 2, 3}
    assert kept_set(logits, top_p=1.0) == {0, 1, 2, 3}


def test_top_p_always_keeps_top_token():
    logits = log_probs(0.97, 0.01, 0.01, 0.01)
    assert kept_set(logits, top_p=1e-6) == {0}


def test_top_p_keeps_ties_with_the_cut_token():
    # probs ~ 0.534, 0.197, 0.197, 0.072: cumulative 0.534, 0.731 -> p=0.6 cuts at a tied pair.
    logits = [2.0, 1.0, 1.0, 0.0]
    assert kept_set(logits, top_p=0.6) == {0, 1, 2}
    assert kept_set(logits, top_p=0.5) == {0}
    assert kept_set(logits, top_p=0.95) == {0, 1, 2, 3}


def test_top_p_runs_after_top_k_on_renormalised_probs():
    logits = log_probs(0.4, 0.3, 0.2, 0.1)
    # Alone, p=0.75 needs 0.4+0.3+0.2. After top-k=3 the probs are 4/9, 3/9, 2/9 and
    # 4/9+3/9 = 0.78 already reaches 0.75.
    assert kept_set(logits, top_p=0.75) == {0, 1, 2}
    assert kept_set(logits, top_k=3, top_p=0.75) == {0, 1}
    # Top-k tighter than top-p: top-k decides.
    assert kept_set(logits, top_k=1, top_p=0.95) == {0}


def test_min_p_drops_tokens_below_fraction_of_max():
    logits = log_probs(0.5, 0.25, 0.15, 0.1)
    assert kept_set(logits, min_p=0.25) == {0, 1, 2}  # threshold 0.125
    assert kept_set(logits, min_p=0.4) == {0, 1}  # threshold 0.2
    assert kept_set(logits, min_p=0.9) == {0}
    assert kept_set([1.0, 1.0, 0.0], min_p=1.0) == {0, 1}  # ties with the max stay


def test_temperature_changes_top_p_support():
    logits = log_probs(0.6, 0.3, 0.1)
    assert kept_set(logits, top_p=0.8) == {0, 1}
    # A low temperature sharpens: probs ~ (0.8, 0.2, 0.007) at T=0.5 -> the top token reaches 0.75.
    assert kept_set(logits, temperature=0.5, top_p=0.75) == {0}
    # A high temperature flattens: probs ~ (0.47, 0.33, 0.19) at T=2 -> 0.85 needs all three.
    assert kept_set(logits, top_p=0.85) == {0, 1}
    assert kept_set(logits, temperature=2.0, top_p=0.85) == {0, 1, 2}


def reference_support(logits, temperature, top_k, top_p, min_p) -> set[int]:
    """The rules of the module docstring, written as a plain loop in float64."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    kept = set(order)
    if min_p > 0:
        top = max(scaled)
        kept = {i for i in kept if math.exp(scaled[i] - top) >= min_p}
    if 0 < top_k < len(scaled):
        kth = scaled[order[top_k - 1]]
        kept = {i for i in kept if scaled[i] >= kth}
    if top_p < 1:
        top = max(scaled)
        weights = {i: math.exp(scaled[i] - top) for i in kept}
        total = sum(weights.values())
        cumulative = 0.0
        for i in order:
            if i not in kept:
                continue
            cumulative += weights[i] / total
            if cumulative >= top_p:
                cut = scaled[i]
                break
        kept = {i for i in kept if scaled[i] >= cut}
    return kept


def test_support_matches_reference_on_random_rows():
    # Integer logits force many ties; a batch of rows with different params checks that the
    # vectorised path keeps each row's parameters to its own row.
    gen = torch.Generator().manual_seed(1)
    num_rows, vocab = 64, 12
    logits = torch.randint(-4, 5, (num_rows, vocab), generator=gen).float() / 2
    temperature = [0.5, 1.0, 1.7, 3.0] * (num_rows // 4)
    top_k = torch.randint(-1, vocab + 2, (num_rows,), generator=gen).tolist()
    top_k[::3] = [0] * len(top_k[::3])  # some rows top-p / min-p only
    top_p = [1.0, 0.33, 0.61, 0.87, 0.13, 0.995, 0.52, 0.74] * (num_rows // 8)
    min_p = [0.0, 0.0, 0.07, 0.31, 0.0, 0.53, 0.0, 0.19] * (num_rows // 8)
    mask = support_mask(logits, temperature, top_k, top_p, min_p)
    for i in range(num_rows):
        expected = reference_support(
            logits[i].tolist(), temperature[i], top_k[i], top_p[i], min_p[i]
        )
        assert set(mask[i].nonzero().flatten().tolist()) == expected, f"row {i}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "params, expected",
    [
        (dict(top_k=2), {1, 3}),
        (dict(top_p=0.65), {1, 3}),
        (dict(min_p=0.6), {1, 3}),  # threshold 0.24
        (dict(top_k=3, top_p=0.75), {1, 3}),
        (dict(top_p=0.75), {1, 3, 2}),
        (dict(), {0, 1, 2, 3}),
    ],
)
def test_drawn_tokens_cover_exactly_the_support(device, params, expected):
    logits = log_probs(0.1, 0.4, 0.2, 0.3)
    drawn = draw_many(logits, params, num_draws=400, device=device)
    # 400 draws: a kept token has prob >= 0.1 here, so missing one has chance < 0.9**400.
    assert set(drawn) == expected


@pytest.mark.parametrize("device", DEVICES)
def test_draw_frequencies_match_renormalised_probs(device):
    probs = [0.1, 0.4, 0.2, 0.3]
    num_draws = 4000
    drawn = draw_many(log_probs(*probs), dict(temperature=1.0), num_draws, device)
    for token, p in enumerate(probs):
        # Binomial std is at most 0.008 here; 5 sigma keeps this test from flaking.
        assert abs(drawn.count(token) / num_draws - p) < 5 * math.sqrt(p * (1 - p) / num_draws)


# ----------------------------------------------------------------------------- greedy and seeds


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_with_ties_to_lowest_id(device):
    logits = torch.tensor(
        [[0.0, 5.0, 1.0, 5.0], [9.0, 9.0, 9.0, 9.0], [-1.0, -3.0, -0.5, -2.0]], device=device
    )
    rows = [row(SamplingParams(temperature=0.0)) for _ in range(3)]
    assert [t.token_id for t in Sampler(seed=0)(logits, rows)] == [1, 0, 2]


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_request_is_independent_of_batch(device):
    """Same seeded request alone, and at varying positions among other rows: same tokens."""
    vocab, steps = 50, 40
    gen = torch.Generator().manual_seed(7)
    own_logits = (torch.randn(steps, vocab, generator=gen) * 2).to(device)
    params = SamplingParams(seed=1234, temperature=0.9, top_p=0.95, top_k=30)

    alone_sampler = Sampler(seed=0)
    alone_row = row(params, device)
    alone = [alone_sampler(own_logits[s : s + 1], [alone_row])[0].token_id for s in range(steps)]

    batch_sampler = Sampler(seed=99)
    target = row(params, device)
    others = [
        row(SamplingParams(seed=5, temperature=1.0), device),
        row(SamplingParams(temperature=1.2, min_p=0.05), device),
        row(SamplingParams(temperature=0.0), device),
        row(SamplingParams(seed=1234, temperature=0.7), device),  # same seed, own generator
    ]
    in_batch = []
    for s in range(steps):
        position = s % (len(others) + 1)
        batch_rows = others[:position] + [target] + others[position:]
        logits = (torch.randn(len(batch_rows), vocab, generator=gen) * 2).to(device)
        logits[position] = own_logits[s]
        in_batch.append(batch_sampler(logits, batch_rows)[position].token_id)

    assert in_batch == alone
    # The tokens are really random draws, not a greedy path in disguise.
    assert alone != own_logits.argmax(dim=-1).tolist()
    other_seed = row(SamplingParams(seed=4321, temperature=0.9, top_p=0.95, top_k=30), device)
    assert alone != [
        Sampler(seed=0)(own_logits[s : s + 1], [other_seed])[0].token_id for s in range(steps)
    ]


def test_unseeded_runs_repeat_with_same_sampler_seed():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(3))
    rows = [row(SamplingParams(temperature=1.0)) for _ in range(8)]
    first = [t.token_id for t in Sampler(seed=11)(logits, rows)]
    again = [t.token_id for t in Sampler(seed=11)(logits, rows)]
    other = [t.token_id for t in Sampler(seed=12)(logits, rows)]
    assert first == again
    assert first != other


def test_generator_on_wrong_device_is_refused():
    logits = torch.zeros(1, 4, device="meta")
    with pytest.raises(ValueError, match="generator"):
        Sampler(seed=0)(logits, [row(SamplingParams(seed=1))])


# ----------------------------------------------------------------------------------- min_tokens


@pytest.mark.parametrize("device", DEVICES)
def test_min_tokens_blocks_eos_and_stop_ids(device):
    eos, stop = 3, 1
    logits = torch.tensor([[0.0, 8.0, 2.0, 9.0, 1.0]], device=device)

    def greedy_pick(generated: int, **kwargs) -> int:
        params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[stop], **kwargs)
        params._eos_token_ids = (eos,)
        return Sampler(seed=0)(logits, [row(params, device, [5] * generated)])[0].token_id

    assert greedy_pick(0) == 2  # eos and the stop id both blocked
    assert greedy_pick(1) == 2
    assert greedy_pick(2) == eos  # min_tokens reached
    assert greedy_pick(0, ignore_eos=True) == eos  # eos is no stop token then, as in vLLM

    # Sampling rows too: the blocked ids are never drawn, and logprobs stay raw.
    params = [SamplingParams(seed=s, min_tokens=1, stop_token_ids=[stop], logprobs=0)
              for s in range(200)]
    for p in params:
        p._eos_token_ids = (eos,)
    batch = logits.repeat(200, 1)
    drawn = Sampler(seed=0)(batch, [row(p, device) for p in params])
    assert {t.token_id for t in drawn} == {0, 2, 4}
    raw = torch.log_softmax(logits[0].cpu(), dim=-1)
    for t in drawn:
        assert t.logprob == pytest.approx(raw[t.token_id].item(), abs=1e-5)


# ------------------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_top_k_and_chosen_rank(device):
    gen = torch.Generator().manual_seed(5)
    num_rows, vocab, k = 64, 20, 3
    logits = torch.randn(num_rows, vocab, generator=gen) * 3
    rows = [
        row(SamplingParams(seed=s, temperature=1.5, logprobs=k), device) for s in range(num_rows)
    ]
    sampled = Sampler(seed=0)(logits.to(device), rows)
    # fp32 log-softmax computed two ways agrees to a few ulps of values of magnitude ~10.
    tol = 1e-5
    raw = torch.log_softmax(logits, dim=-1)
    chosen_outside_top = 0
    for i, token in enumerate(sampled):
        order = raw[i].argsort(descending=True).tolist()
        rank_of = {t: r + 1 for r, t in enumerate(order)}  # random floats: no ties
        assert token.logprob == pytest.approx(raw[i, token.token_id].item(), abs=tol)
        top = token.top_logprobs
        assert set(top) == set(order[:k]) | {token.token_id}
        for token_id, entry in top.items():
            assert entry.rank == rank_of[token_id]
            assert entry.logprob == pytest.approx(raw[i, token_id].item(), abs=tol)
        assert top[token.token_id].logprob == token.logprob
        chosen_outside_top += token.token_id not in order[:k]
    assert chosen_outside_top > 0  # the rank of a chosen token outside the top-k was checked


def test_logprobs_zero_and_none():
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    # min_tokens blocks eos = the top token in row 0, so the rank-2 token is chosen there.
    params = [
        SamplingParams(temperature=0.0, logprobs=0, min_tokens=1),
        SamplingParams(temperature=0.0, min_tokens=1),
    ]
    params[0]._eos_token_ids = params[1]._eos_token_ids = (1,)
    with_zero, without = Sampler(seed=0)(logits, [row(params[0]), row(params[1], output=[7])])
    assert with_zero.token_id == 2
    assert list(with_zero.top_logprobs) == [2]
    assert with_zero.top_logprobs[2].rank == 2
    assert without.top_logprobs is None and without.token_id == 1


def test_logprob_ranks_with_ties():
    # Competition ranks: equal logits share a rank; lower ids listed first at the boundary.
    logits = torch.tensor([[1.0, 4.0, 4.0, 2.0, 4.0, 0.0]])
    params = SamplingParams(temperature=0.0, logprobs=2, min_tokens=1)
    params._eos_token_ids = (1, 2, 4)
    (token,) = Sampler(seed=0)(logits, [row(params)])
    assert token.token_id == 3
    ranks = {t: e.rank for t, e in token.top_logprobs.items()}
    assert ranks == {1: 1, 2: 1, 3: 4}
    # The given token tied with a listed one, and tied ones outside the list: shared ranks.
    (entries,) = prompt_logprobs(torch.tensor([[1.0, 3.0, 3.0, 0.0, 1.0]]), [2], 1)
    assert {t: e.rank for t, e in entries.items()} == {2: 1, 1: 1}
    (entries,) = prompt_logprobs(torch.tensor([[1.0, 3.0, 3.0, 0.0, 1.0]]), [4], 3)
    assert {t: e.rank for t, e in entries.items()} == {4: 3, 1: 1, 2: 1, 0: 3}


def test_prompt_logprobs_ranks_and_values():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(30, 16, generator=gen)
    next_ids = torch.randint(0, 16, (30,), generator=gen).tolist()
    raw = torch.log_softmax(logits, dim=-1)
    for k in (0, 2, 16, 40):
        result = prompt_logprobs(logits, next_ids, k)
        assert len(result) == 30
        for i, entries in enumerate(result):
            order = raw[i].argsort(descending=True).tolist()
            expected_ids = set(order[: min(k, 16)]) | {next_ids[i]}
            assert set(entries) == expected_ids
            for token_id, entry in entries.items():
                assert entry.rank == order.index(token_id) + 1
                assert entry.logprob == pytest.approx(raw[i, token_id].item(), abs=1e-5)


def test_prompt_logprobs_chunks_agree(monkeypatch):
    import cpserve.engine.logprobs as logprobs_module

    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(10, 8, generator=gen)
    next_ids = list(range(8)) + [0, 1]
    whole = prompt_logprobs(logits, next_ids, 3)
    monkeypatch.setattr(logprobs_module, "PROMPT_LOGPROBS_CHUNK_ELEMENTS", 24)  # 3 rows a chunk
    assert prompt_logprobs(logits, next_ids, 3) == whole


@pytest.mark.parametrize("device", DEVICES)
def test_top_ids_break_ties_by_lowest_id(device):
    # bf16-rounded logprobs have many exact ties, negatives, -0.0 and -inf: the int64 key must
    # order them exactly as a stable descending sort does.
    gen = torch.Generator().manual_seed(4)
    values = (torch.randn(16, 300, generator=gen) * 4).bfloat16().float()
    values[0, :5] = torch.tensor([0.0, -0.0, -0.0, 0.0, float("-inf")])
    values[1] = float("-inf")
    expected = values.sort(dim=-1, descending=True, stable=True).indices[:, :40]
    assert torch.equal(_top_ids(values.to(device), 40).cpu(), expected)


# ---------------------------------------------------------------- vLLM's order, bias, limits


def test_min_p_applies_before_top_p_as_in_vllm():
    # min-p drops the two 0.1 tokens; top-p then sees [0.625, 0.375] and keeps the first
    # alone. The other order (top-p on all four, then min-p) would keep {0, 1}.
    logits = log_probs(0.5, 0.3, 0.1, 0.1)
    assert kept_set(logits, min_p=0.3, top_p=0.6) == {0}


def test_logit_bias_moves_greedy_and_sampled_tokens_but_not_raw_logprobs():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 2)
    greedy = SamplingParams(temperature=0, logit_bias={3: 5.0}, logprobs=0)
    banned = SamplingParams(temperature=1.0, seed=3, logit_bias={0: -100, 1: -100, 2: -100})
    out = Sampler(seed=0)(logits, [row(greedy), row(banned)])
    assert out[0].token_id == 3 and out[1].token_id == 3
    # Logprobs stay the model's (vLLM's raw logprobs), whatever the bias.
    assert out[0].logprob == pytest.approx(logits[0].log_softmax(-1)[3].item())


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 5e-6])
def test_temperatures_below_epsilon_are_greedy_not_nan(temperature):
    params = SamplingParams(temperature=temperature, logprobs=1)
    assert params.greedy
    logits = torch.tensor([[0.5, 3.0, 2.9, -1.0]])
    out = Sampler(seed=0)(logits, [row(params)])[0]
    assert out.token_id == 1 and math.isfinite(out.logprob)


@pytest.mark.parametrize("field,value,limit", [
    ("stop", ["x"] * 65, "limit is 64"),
    ("stop", ["x" * 1025], "1024 characters"),
    ("stop_token_ids", list(range(1025)), "limit is 1024"),
    ("logit_bias", {i: 1.0 for i in range(1025)}, "limit is 1024"),
    ("logit_bias", {3: 100.5}, r"\[-100, 100\]"),
    ("logit_bias", {3: float("nan")}, r"\[-100, 100\]"),
    ("logit_bias", {-1: 1.0}, "token ids"),
    ("seed", 2**64, "seed must be an integer in"),
    ("seed", -(2**63) - 1, "seed must be an integer in"),
])
def test_every_list_and_number_is_bounded(field, value, limit):
    with pytest.raises(ValueError, match=limit):
        SamplingParams(**{field: value})


def test_child_seeds_stay_in_torch_range():
    params = SamplingParams(seed=2**64 - 1, n=3)
    seeds = [params.child_seed(i) for i in range(3)]
    assert seeds[0] == 2**64 - 1 and len(set(seeds)) == 3
    for seed in seeds:
        make_generator(seed, "cpu")  # torch raises for a seed out of its range


# ------------------------------------------------------------------------------- fast paths


def test_top_k_threshold_by_selection_equals_the_sort():
    """The partial-selection path gives the sort's threshold, ties and top-p included."""
    from cpserve.engine.sampler import (
        _top_k_top_p_threshold,
        _top_k_top_p_threshold_by_selection,
    )

    gen = torch.Generator().manual_seed(8)
    rows, vocab = 512, 40
    scaled = torch.randint(-6, 7, (rows, vocab), generator=gen).float() / 3  # many ties
    scaled[::7, ::5] = float("-inf")  # tokens blocked by min_tokens or min-p
    top_k = torch.randint(1, vocab, (rows,), generator=gen).tolist()
    top_p = torch.tensor([1.0, 0.2, 0.5, 0.8, 0.9, 0.99, 0.999, 0.65] * (rows // 8))
    by_sort = _top_k_top_p_threshold(scaled, top_k, top_p)
    by_selection = _top_k_top_p_threshold_by_selection(scaled, top_k, top_p)
    assert torch.equal(by_selection, by_sort)


def test_greedy_rows_take_the_argmax_alone(monkeypatch):
    """Greedy rows without logprobs: no filter, no softmax, no log-softmax; sampled and
    logprob rows pay for those passes alone."""
    import cpserve.engine.sampler as sampler_module

    calls = {"filter": [], "logprobs": []}
    original_filter, original_logprobs = sampler_module._filter, sampler_module.logprob_tensors
    monkeypatch.setattr(sampler_module, "_filter", lambda scaled, *a: calls["filter"].append(
        scaled.shape[0]) or original_filter(scaled, *a))
    monkeypatch.setattr(sampler_module, "logprob_tensors", lambda raw, *a: calls[
        "logprobs"].append(raw.shape[0]) or original_logprobs(raw, *a))
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(1))
    greedy = [row(SamplingParams(temperature=0.0)) for _ in range(6)]
    tokens = Sampler(seed=0)(logits, greedy)
    assert [t.token_id for t in tokens] == logits.argmax(dim=-1).tolist()
    assert all(t.logprob is None and t.top_logprobs is None for t in tokens)
    assert calls == {"filter": [], "logprobs": []}
    mixed = greedy[:4] + [row(SamplingParams(temperature=0.7, top_k=5)),
                          row(SamplingParams(temperature=0.0, logprobs=2))]
    tokens = Sampler(seed=0)(logits, mixed)
    assert calls == {"filter": [1], "logprobs": [1]}
    assert tokens[5].logprob == pytest.approx(logits[5].log_softmax(-1).max().item(), abs=1e-6)
    assert [t.token_id for t in tokens[:4]] == logits[:4].argmax(dim=-1).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_rows_with_non_finite_logits_are_flagged_with_a_valid_token(device):
    logits = torch.randn(4, 16, generator=torch.Generator().manual_seed(2)).to(device)
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    rows = [row(SamplingParams(temperature=t), device) for t in (0.0, 0.0, 1.0, 1.0)]
    batch = Sampler(seed=0).sample(logits, rows)
    assert batch.token_ids.device.type == torch.device(device).type  # stays on the device
    tokens = batch.resolve()
    assert [t.finite for t in tokens] == [True, False, False, True]
    assert tokens[1].token_id == tokens[2].token_id == 0
    assert tokens[0].token_id == logits[0].argmax().item()
