"""Sampling parameters of one request, named and defaulted as in vLLM."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Below this a temperature is greedy, as in vLLM: dividing logits by it would overflow.
SAMPLING_EPS = 1e-5
# Bounds on what one request may ask for, so that no request can make every step slow.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS_ENTRIES = 1024
LOGIT_BIAS_RANGE = 100.0  # OpenAI's: a bias is in [-100, 100]
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    `top_k <= 0` and `top_p == 1` disable those filters; a temperature below `SAMPLING_EPS`
    (0 included) is greedy. `logprobs=k` returns, for every generated token, the top-k
    alternatives plus the chosen token (so up to k+1 entries); `prompt_logprobs=k` does the
    same for prompt tokens. `logit_bias` maps token ids to a number in [-100, 100] added to
    their logits before sampling (greedy too), as in OpenAI's API and vLLM.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    # > 1 discourages tokens already in the prompt or the output, < 1 favours them (vLLM's and
    # transformers' rule: a positive logit is divided by it, a negative one multiplied).
    repetition_penalty: float = 1.0
    # Filled by the engine from generation_config.json; not a user field.
    _eos_token_ids: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "must be -1, 0 (disabled) or a positive integer")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "must be > 0")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise bad("min_tokens", "must be in [0, max_tokens]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise bad(name, "must be a non-negative integer")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(self.stop)} strings; the limit is "
                             f"{MAX_STOP_STRINGS}")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise ValueError(f"a stop string is longer than the limit of "
                             f"{MAX_STOP_STRING_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids has {len(self.stop_token_ids)} ids; the limit is "
                             f"{MAX_STOP_TOKEN_IDS}")
        if self.seed is not None and (not isinstance(self.seed, int)
                                      or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise bad("seed", f"must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
        if self.logit_bias is not None:
            if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
                raise ValueError(f"logit_bias has {len(self.logit_bias)} entries; the limit is "
                                 f"{MAX_LOGIT_BIAS_ENTRIES}")
            for token_id, bias in self.logit_bias.items():
                if not isinstance(token_id, int) or token_id < 0:
                    raise ValueError(f"logit_bias keys must be token ids (integers >= 0), "
                                     f"got {token_id!r}")
                if not (isinstance(bias, int | float) and math.isfinite(bias)
                        and abs(bias) <= LOGIT_BIAS_RANGE):
                    raise ValueError(f"logit_bias for token {token_id} must be a number in "
                                     f"[-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}], "
                                     f"got {bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def child_seed(self, index: int) -> int | None:
        """The seed of completion `index` of `n`: seed + index, kept in torch's range."""
        if self.seed is None:
            return None
        seed = self.seed + index
        return seed if seed <= SEED_RANGE[1] else seed - 2**64
