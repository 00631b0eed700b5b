"""User-facing engine arguments: one flat dataclass shared by `LLM(...)` and the CLI.

Names follow vLLM (`tensor_parallel_size` / `-tp`, `max_num_batched_tokens`, ...), so users can
bring their launch commands along. `create_engine_config()` resolves the model and builds the
frozen `EngineConfig`, where every rule is checked.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import torch

from cpserve.config import (
    CacheConfig,
    ConfigError,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)


@dataclass
class EngineArgs:
    model: str = "tiny"
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: float | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_waiting_requests: int = 4096
    tensor_parallel_size: int = 1
    prefill_context_parallel_size: int = 1
    decode_context_parallel_size: int = 1
    cp_kv_cache_interleave_size: int = 1
    pcp_kv_exchange: str = "allgather"
    enforce_eager: bool = False
    load_format: str = "auto"
    quantization: str | None = None
    kv_cache_dtype: str = "auto"

    def create_engine_config(self) -> EngineConfig:
        from cpserve.models.demo import resolve_model_path

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible")
        model = ModelConfig.from_pretrained(resolve_model_path(self.model), self.dtype,
                                            self.max_model_len, self.quantization)
        max_batched = self.max_num_batched_tokens or max(8192, self.max_num_seqs)
        return EngineConfig(
            model=model,
            parallel=ParallelConfig(
                tensor_parallel_size=self.tensor_parallel_size,
                prefill_context_parallel_size=self.prefill_context_parallel_size,
                decode_context_parallel_size=self.decode_context_parallel_size,
                cp_kv_cache_interleave_size=self.cp_kv_cache_interleave_size,
                kv_exchange=self.pcp_kv_exchange,
            ),
            cache=CacheConfig(
                block_size=self.block_size,
                num_blocks=self.num_kv_blocks,
                kv_cache_memory_gib=self.kv_cache_memory,
                gpu_memory_utilization=self.gpu_memory_utilization,
                enable_prefix_caching=self.enable_prefix_caching,
                kv_cache_dtype=self.kv_cache_dtype,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=max_batched,
                max_waiting_requests=self.max_waiting_requests,
            ),
            device=device,
            seed=self.seed,
            enforce_eager=self.enforce_eager,
            load_format=self.load_format,
        )

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, with_model: bool = True) -> None:
        """Engine flags with vLLM's names."""
        from cpserve.engine.model_runner import CPU_DEFAULT_KV_GIB
        if with_model:
            parser.add_argument("model", nargs="?", default="tiny",
                                help="checkpoint directory, or 'tiny' for the built-in demo model")
        g = parser.add_argument_group("engine")
        g.add_argument("--dtype", default="auto",
                       choices=["auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16",
                                "half", "float"])
        g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--max-model-len", type=int, default=None)
        g.add_argument("--block-size", type=int, default=16)
        g.add_argument("--num-kv-blocks", type=int, default=None,
                       help="KV blocks per rank (overrides --kv-cache-memory)")
        g.add_argument("--kv-cache-memory", type=float, default=None,
                       help=f"GiB of KV cache per rank (CPU default: {CPU_DEFAULT_KV_GIB} GiB)")
        g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=True)
        g.add_argument("--max-num-seqs", type=int, default=256)
        g.add_argument("--max-num-batched-tokens", type=int, default=None)
        g.add_argument("--max-waiting-requests", type=int, default=4096)
        g.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
        g.add_argument("-pcp", "--prefill-context-parallel-size", type=int, default=1)
        g.add_argument("-dcp", "--decode-context-parallel-size", type=int, default=1)
        g.add_argument("--cp-kv-cache-interleave-size", type=int, default=1)
        g.add_argument("--pcp-kv-exchange", default="allgather", choices=["allgather", "ring"])
        g.add_argument("--enforce-eager", action="store_true",
                       help="no CUDA graphs for decode steps")
        g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                       help="dummy: random weights made on the device, for benchmarks")
        q = parser.add_argument_group("quantization")
        q.add_argument("-q", "--quantization", default=None,
                       help="fp8: quantize bf16 weights to FP8 at load (per channel); "
                            "FP8 checkpoints (fp8, compressed-tensors) are found from their "
                            "config.json without it")
        q.add_argument("--kv-cache-dtype", default="auto",
                       help="auto: the model's dtype; fp8 (fp8_e4m3): an e4m3 KV cache, "
                            "half the bytes per token, scales from the checkpoint or "
                            "computed at start-up")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})
