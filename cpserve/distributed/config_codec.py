"""EngineConfig as a plain dict of JSON types, so it can cross a process boundary unpickled
(to the ranks, and to the server's engine process).

Sampling defaults stay with the front end, which fills the requests' unset fields.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from cpserve.config import (
    CacheConfig,
    EngineConfig,
    LaunchConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)


def config_to_dict(config: EngineConfig) -> dict:
    return {
        "model": {"path": config.model.path, "dtype": str(config.model.dtype).removeprefix("torch."),
                  "max_model_len": config.model.max_model_len,
                  "quantization": config.model.quantization,
                  "tokenizer": config.model.tokenizer},
        "parallel": asdict(config.parallel),
        "cache": asdict(config.cache),
        "scheduler": asdict(config.scheduler),
        "device": config.device,
        "seed": config.seed,
        "enforce_eager": config.enforce_eager,
        "load_format": config.load_format,
        "launch": asdict(config.launch),
        "cudagraph_capture_sizes": (None if config.cudagraph_capture_sizes is None
                                    else list(config.cudagraph_capture_sizes)),
        "max_logprobs": config.max_logprobs,
    }


def config_from_dict(data: dict) -> EngineConfig:
    model = data["model"]
    return EngineConfig(
        model=ModelConfig.from_pretrained(model["path"], getattr(torch, model["dtype"]),
                                          model["max_model_len"], model["quantization"],
                                          model.get("tokenizer")),
        parallel=ParallelConfig(**data["parallel"]),
        cache=CacheConfig(**data["cache"]),
        scheduler=SchedulerConfig(**data["scheduler"]),
        device=data["device"],
        seed=data["seed"],
        enforce_eager=data["enforce_eager"],
        load_format=data["load_format"],
        launch=LaunchConfig(**data["launch"]),
        cudagraph_capture_sizes=(None if data["cudagraph_capture_sizes"] is None
                                 else tuple(data["cudagraph_capture_sizes"])),
        max_logprobs=data["max_logprobs"],
    )
