"""`--speculative-config` / `LLM(speculative_config={...})`: vLLM's JSON, checked at start-up.

    {"method": "ngram", "num_speculative_tokens": K,
     "prompt_lookup_max": M, "prompt_lookup_min": m}        prompt lookup over the request
    {"method": "deepseek_mtp", "num_speculative_tokens": K}  the checkpoint's MTP modules
                                                             ("mtp" is accepted too)

K draft tokens per request and step; n-gram matches of M down to m tokens. Any other field,
method or value is refused with a message naming it: a setting cpserve would ignore must not
look honoured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cpserve.config import ConfigError

if TYPE_CHECKING:
    from cpserve.config import EngineConfig

FLAG = "--speculative-config"
METHODS = {"ngram": "ngram", "[ngram]": "ngram", "deepseek_mtp": "mtp", "mtp": "mtp"}
FIELDS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model")
# vLLM's n-gram window when the config gives no prompt_lookup_max.
DEFAULT_PROMPT_LOOKUP_MAX = 5
# Each draft is one more query row per request and step; beyond this the verification step
# stops looking like a decode step (and acceptance of the late positions is tiny anyway).
MAX_SPECULATIVE_TOKENS = 16
MTP_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # "ngram" or "mtp"
    num_speculative_tokens: int
    prompt_lookup_max: int = 0  # n-gram only
    prompt_lookup_min: int = 0

    @property
    def is_mtp(self) -> bool:
        return self.method == "mtp"

    @property
    def max_queries_per_request(self) -> int:
        """Rows one request computes in a verification step: its last token and K drafts."""
        return 1 + self.num_speculative_tokens

    @property
    def lookahead_tokens(self) -> int:
        """KV slots a request needs beyond its verification step: MTP drafts K - 1 tokens
        after the last accepted one, each written to the MTP module's cache first."""
        return self.num_speculative_tokens if self.is_mtp else 0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "num_speculative_tokens": self.num_speculative_tokens,
                "prompt_lookup_max": self.prompt_lookup_max,
                "prompt_lookup_min": self.prompt_lookup_min}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> SpeculativeConfig:
        return SpeculativeConfig(**data)

    def check(self, cfg: EngineConfig) -> None:
        """The rules that need the rest of the engine's configuration."""
        model = cfg.model
        if self.is_mtp:
            if model.architecture not in MTP_ARCHITECTURES:
                raise ConfigError(f"{FLAG} method 'deepseek_mtp' needs a DeepSeek-V3 checkpoint "
                                  f"with multi-token prediction modules; {model.architecture} "
                                  "has none (use method 'ngram')")
            if num_mtp_modules(model.hf_config) < 1:
                raise ConfigError(f"{FLAG} method 'deepseek_mtp': this checkpoint's config.json "
                                  "has no num_nextn_predict_layers >= 1, so it carries no MTP "
                                  "module (use method 'ngram')")
            if cfg.cache.fp8_kv:
                # The MTP modules' caches would need FP8 scales of their own, which neither
                # the checkpoint's main layers nor the warm-up prefill (quantization/
                # kv_cache.py) give; n-gram drafts verify over an FP8 cache as usual.
                raise ConfigError(f"{FLAG} method 'deepseek_mtp' cannot run with "
                                  f"--kv-cache-dtype {cfg.cache.kv_cache_dtype}: the MTP "
                                  "modules' KV caches have no FP8 scales; use --kv-cache-dtype "
                                  "auto, or method 'ngram' with the FP8 cache")
        rows = self.max_queries_per_request
        if rows > cfg.scheduler.max_num_batched_tokens:
            raise ConfigError(f"{FLAG} num_speculative_tokens={self.num_speculative_tokens}: a "
                              f"verification step computes {rows} tokens per request, more "
                              f"than --max-num-batched-tokens="
                              f"{cfg.scheduler.max_num_batched_tokens}")


def num_mtp_modules(hf_config: dict[str, Any]) -> int:
    return int(hf_config.get("num_nextn_predict_layers") or 0)


def parse_speculative_config(raw: dict[str, Any] | None, model_names: tuple[str, ...],
                             hf_config: dict[str, Any]) -> SpeculativeConfig | None:
    """vLLM's JSON -> SpeculativeConfig; every refusal names the field and the rule.
    `model_names`: how the served model may be named (as given, as resolved)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{FLAG} must be a JSON object, got {raw!r}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{FLAG} field(s) {', '.join(unknown)} are not supported; cpserve "
                          f"takes {', '.join(FIELDS)}")
    method = raw.get("method")
    if method not in METHODS:
        raise ConfigError(f"{FLAG} method {method!r} is not supported: use 'ngram' (prompt "
                          "lookup) or 'deepseek_mtp' / 'mtp' (the checkpoint's MTP modules)")
    kind = METHODS[method]
    draft_model = raw.get("model")
    if draft_model is not None and (kind == "ngram" or str(draft_model) not in model_names):
        raise ConfigError(f"{FLAG} model={draft_model!r}: a separate draft model is not "
                          "supported (n-gram needs none; MTP uses the served checkpoint's "
                          "own modules): leave 'model' out")
    k = raw.get("num_speculative_tokens")
    if k is None and kind == "mtp":
        k = num_mtp_modules(hf_config) or None  # vLLM's default: one draft per module
    if k is None:
        raise ConfigError(f"{FLAG} needs num_speculative_tokens (draft tokens per step)")
    _check_int("num_speculative_tokens", k, 1, MAX_SPECULATIVE_TOKENS)
    if kind == "mtp":
        for name in ("prompt_lookup_max", "prompt_lookup_min"):
            if raw.get(name) is not None:
                raise ConfigError(f"{FLAG} {name} is an n-gram setting; method {method!r} "
                                  "does not use it")
        return SpeculativeConfig("mtp", k)
    low = raw.get("prompt_lookup_min", 1)
    _check_int("prompt_lookup_min", low, 1, None)
    high = raw.get("prompt_lookup_max", max(DEFAULT_PROMPT_LOOKUP_MAX, low))
    _check_int("prompt_lookup_max", high, 1, None)
    if high < low:
        raise ConfigError(f"{FLAG} prompt_lookup_max={high} must be >= prompt_lookup_min={low}")
    return SpeculativeConfig("ngram", k, high, low)


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{FLAG} {name}={value!r} must be an integer {bound}")
