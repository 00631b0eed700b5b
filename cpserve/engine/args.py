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

# Step budget when --max-num-batched-tokens is not given (with chunked prefill).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
# With chunked prefill and no --long-prefill-token-threshold, a long prompt takes at most
# this share of each step's budget: the rest serves decodes and newly arrived requests.
DEFAULT_LONG_PREFILL_SHARE = 0.5


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
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int | None = None  # None: a share of the step budget
    tensor_parallel_size: int = 1
    prefill_context_parallel_size: int = 1
    decode_context_parallel_size: int = 1
    cp_kv_cache_interleave_size: int = 1
    pcp_kv_exchange: str = "allgather"
    enforce_eager: bool = False
    load_format: str = "auto"

    def create_engine_config(self) -> EngineConfig:
        from cpserve.models.demo import resolve_model_path

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible")
        model = ModelConfig.from_pretrained(resolve_model_path(self.model), self.dtype,
                                            self.max_model_len)
        max_batched, threshold = self.step_budget(model.max_model_len)
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
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=max_batched,
                max_waiting_requests=self.max_waiting_requests,
                enable_chunked_prefill=self.enable_chunked_prefill,
                long_prefill_token_threshold=threshold,
            ),
            device=device,
            seed=self.seed,
            enforce_eager=self.enforce_eager,
            load_format=self.load_format,
        )

    def step_budget(self, max_model_len: int) -> tuple[int, int]:
        """(max_num_batched_tokens, long_prefill_token_threshold) with defaults filled in.
        Without chunked prefill the budget must hold a whole prompt, as in vLLM."""
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = max(DEFAULT_MAX_NUM_BATCHED_TOKENS, self.max_num_seqs)
            if not self.enable_chunked_prefill:
                budget = max(budget, max_model_len)
        threshold = self.long_prefill_token_threshold
        if threshold is None:
            threshold = (max(1, int(budget * DEFAULT_LONG_PREFILL_SHARE))
                         if self.enable_chunked_prefill else 0)
        return budget, threshold

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, with_model: bool = True) -> None:
        """Engine flags with vLLM's names."""
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
                       help="GiB of KV cache per rank (CPU default: 1 GiB)")
        g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=True)
        g.add_argument("--max-num-seqs", type=int, default=256)
        g.add_argument("--max-num-batched-tokens", type=int, default=None)
        g.add_argument("--max-waiting-requests", type=int, default=4096)
        g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                       default=True,
                       help="compute long prompts over several steps, beside other requests "
                            "(off: a prompt waits until it fits one step)")
        g.add_argument("--long-prefill-token-threshold", type=int, default=None,
                       help="most tokens one request computes in a step; 0: no cap (default: "
                            f"{DEFAULT_LONG_PREFILL_SHARE:g} of --max-num-batched-tokens with "
                            "chunked prefill, so a long prompt never takes a whole step)")
        g.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
        g.add_argument("-pcp", "--prefill-context-parallel-size", type=int, default=1)
        g.add_argument("-dcp", "--decode-context-parallel-size", type=int, default=1)
        g.add_argument("--cp-kv-cache-interleave-size", type=int, default=1)
        g.add_argument("--pcp-kv-exchange", default="allgather", choices=["allgather", "ring"])
        g.add_argument("--enforce-eager", action="store_true",
                       help="no CUDA graphs for decode steps")
        g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                       help="dummy: random weights made on the device, for benchmarks")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})
