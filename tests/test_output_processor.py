"""The front end's pieces that need no model: stop strings matched as text arrives, the
output processor's bookkeeping of n completions, and the wire between the processes."""

from __future__ import annotations

import random

import pytest

from cpserve.engine.args import EngineArgs
from cpserve.engine.input_processor import InputProcessor, load_tokenizer
from cpserve.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
    decode_outputs,
    decode_request,
    encode_outputs,
    encode_request,
    pack,
    unpack,
)
from cpserve.engine.output_processor import OutputProcessor, RequestOutputKind, StopStrings
from cpserve.outputs import Logprob
from cpserve.sampling_params import SamplingParams


def _feed_all(stops: list[str], include: bool, pieces: list[str]) -> tuple[list[str], str | None]:
    checker = StopStrings(stops, include)
    released = []
    for piece in pieces:
        text, stop = checker.feed(piece, can_stop=True)
        released.append(text)
        if stop is not None:
            return released, stop
    released.append(checker.flush())
    return released, None


def _expected(text: str, pieces: list[str], stops: list[str],
              include: bool) -> tuple[str, str | None]:
    """The text up to the first stop string, as pieces arrive: at the first piece that
    completes one, the match that starts earliest (its end in that piece), the first of the
    list on a tie (as vLLM's order)."""
    end = 0
    for piece in pieces:
        start, end = end, end + len(piece)
        matches = [(i, order, stop) for order, stop in enumerate(stops) for i in range(len(text))
                   if text.startswith(stop, i) and start < i + len(stop) <= end]
        if matches:
            index, _, stop = min(matches)
            return text[:index + len(stop)] if include else text[:index], stop
    return text, None


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_on_text_in_random_pieces(include):
    """Whatever the pieces, the released text adds up to the text before the first stop
    string (with it, if included), and is never more than that at any moment."""
    rng = random.Random(0)
    alphabet = "ab c"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8)))
                      ) if len(text) > 1 else []
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])] if text else []
        released, stop = _feed_all(stops, include, pieces)
        expected_text, expected_stop = _expected(text, pieces, stops, include)
        assert "".join(released) == expected_text, (text, stops, pieces)
        assert stop == expected_stop, (text, stops, pieces)
        for k in range(len(released)):
            assert expected_text.startswith("".join(released[:k + 1]))


def test_text_that_could_start_a_stop_string_is_held_back():
    checker = StopStrings(["STOP"], include=False)
    assert checker.feed("hello ST", True) == ("hello", None)  # " ST" could begin "STOP"
    assert checker.feed("AR", True) == (" S", None)  # "STAR" is not; "TAR" still could
    assert checker.feed(" STO", True) == ("TAR ", None)
    assert checker.feed("P!", True) == ("", "STOP")  # "hello STAR " was all there was


def test_stop_strings_wait_for_min_tokens():
    checker = StopStrings(["x"], include=False)
    assert checker.feed("ax", can_stop=False) == ("ax", None)  # too early: ignored
    assert checker.feed("bx", can_stop=True) == ("b", "x")


@pytest.fixture(scope="module")
def frontend():
    config = EngineArgs(model="tiny", max_model_len=256, num_kv_blocks=64).create_engine_config()
    tokenizer = load_tokenizer(config)
    return InputProcessor(config, tokenizer), tokenizer


def test_n_completions_fan_out_and_come_back_together(frontend):
    inputs, tokenizer = frontend
    ids = tokenizer.encode("hello")
    params = SamplingParams(n=3, seed=7, max_tokens=4, prompt_logprobs=1)
    sequences = inputs.sequences("r", ids, params, 0.0)
    assert [s.request_id for s in sequences] == ["r#0", "r#1", "r#2"]
    assert [s.params.seed for s in sequences] == [7, 8, 9]
    assert [s.params.prompt_logprobs for s in sequences] == [1, None, None]
    assert [s.counts_prompt for s in sequences] == [True, False, False]
    assert all(s.params.n == 1 for s in sequences)

    processor = OutputProcessor(tokenizer)
    processor.add("r", "hello", ids, params, RequestOutputKind.DELTA, 0.0)
    prompt_positions = [None] + [{t: Logprob(-1.0, 1)} for t in ids[1:]]

    def step(*outputs):
        return processor.process(EngineCoreOutputs(list(outputs), EngineStats(), 1.0, 1))

    # r#1 samples before r#0 has scored the prompt: its news waits for the prompt logprobs.
    a = step(EngineCoreOutput("r#1", [300], [-0.5]))
    assert a.outputs == [] and a.new_tokens == {"r": 1}
    b = step(EngineCoreOutput("r#0", [301], [-0.25], new_prompt_logprobs=prompt_positions),
             EngineCoreOutput("r#2", [302], [-0.75], finish_reason="length"))
    (out,) = b.outputs
    assert out.prompt_logprobs == prompt_positions and not out.finished
    assert {c.index: c.token_ids for c in out.outputs} == {0: [301], 1: [300], 2: [302]}
    assert [c.finish_reason for c in out.outputs] == [None, None, "length"]
    c = step(EngineCoreOutput("r#0", [303], [-1.0], finish_reason="length"),
             EngineCoreOutput("r#1", [304], [-1.0], finish_reason="stop", stop_reason=5))
    (out,) = c.outputs
    assert out.finished and out.prompt_logprobs is None  # sent once
    assert {c.index: c.token_ids for c in out.outputs} == {0: [303], 1: [304]}
    (summary,) = c.finished
    assert summary.num_generated_tokens == [2, 2, 1]
    assert summary.finish_reasons == ["length", "stop", "length"]
    assert len(processor) == 0  # all it held of the request is gone


def test_the_wire_carries_every_field(frontend):
    params = SamplingParams(n=1, temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, seed=2**64 - 1,
                            max_tokens=9, min_tokens=2, stop=["a", "bc"], stop_token_ids=[3],
                            ignore_eos=True, logprobs=2, prompt_logprobs=1,
                            skip_special_tokens=False, include_stop_str_in_output=True,
                            logit_bias={5: -1.5, 7: 100})
    request = EngineCoreRequest("id", [1, 2, 3], params, 12.5, counts_prompt=False)
    assert decode_request(unpack(pack(encode_request(request)))) == request
    batch = EngineCoreOutputs(
        [EngineCoreOutput("id", [4, 5], [-0.5, -float("inf")],
                          [{4: Logprob(-0.5, 1)}, {5: Logprob(-float("inf"), 9), 6: Logprob(-1, 1)}],
                          [None, {2: Logprob(-3.0, 4)}], "stop", 5, None, 16, 11.0),
         EngineCoreOutput("other", error="why", finish_reason="error")],
        EngineStats(1, 2, 0.5, 3, 4, 5, 6, 7), 13.0, 42)
    assert decode_outputs(unpack(pack(encode_outputs(batch)))) == batch
