"""Sampling defaults from a checkpoint's generation_config.json, as vLLM's --generation-config.

    --generation-config auto   (default) the model directory's generation_config.json
    --generation-config vllm   none: vLLM's built-in defaults (temperature 1, top_p 1, ...)
    --generation-config DIR    DIR/generation_config.json
    --override-generation-config JSON   set on top of either

Of the file, the fields vLLM reads are taken when present and not null: temperature, top_p,
top_k, min_p, repetition_penalty, and max_new_tokens (as max_tokens). A request (or an `LLM`
call without sampling parameters) that leaves a field unset gets the default; max_tokens is
also a cap on every request, as in vLLM. Other fields (do_sample, eos_token_id) are not
sampling defaults; eos ids are read by ModelConfig.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cpserve.config import ConfigError
from cpserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# generation_config.json name -> SamplingParams field
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
FILE_NAME = "generation_config.json"


def read_sampling_defaults(source: str, model_path: str | Path,
                           overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """SamplingParams field -> default value; empty when nothing sets one."""
    if source == "vllm":
        config: dict[str, Any] = {}
    else:
        directory = Path(model_path) if source == "auto" else Path(source)
        config = _read(directory, explicit=source != "auto")
    config.update(overrides or {})
    unknown = sorted(set(overrides or {}) - set(FIELDS))
    if unknown:
        raise ConfigError(f"--override-generation-config field {unknown[0]!r} is not a "
                          f"sampling default cpserve applies; use {', '.join(FIELDS)}")
    defaults = {FIELDS[name]: config[name] for name in FIELDS if config.get(name) is not None}
    try:
        SamplingParams(**defaults)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the generation config's sampling defaults {defaults} are "
                          f"invalid: {exc}; fix the file or pass --generation-config vllm") from None
    if defaults:
        logger.info("sampling defaults from the generation config: %s (requests that set a "
                    "field override it; --generation-config vllm ignores the file)", defaults)
    return defaults


def _read(directory: Path, explicit: bool) -> dict[str, Any]:
    path = directory / FILE_NAME
    if not path.is_file():
        if explicit:
            raise ConfigError(f"--generation-config {str(directory)!r} has no {FILE_NAME}")
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path} (--generation-config): {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} (--generation-config) is not a JSON object")
    return config
