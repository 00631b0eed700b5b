"""User-facing engine arguments: one flat dataclass shared by `LLM(...)` and the CLI.

Names follow vLLM (`tensor_parallel_size` / `-tp`, `max_num_batched_tokens`, ...), so users can
bring their launch commands along. `create_engine_config()` resolves the model and builds the
frozen `EngineConfig`, where every rule is checked.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, fields
from typing import Any

import torch

from cpserve.config import (
    CacheConfig,
    ConfigError,
    EngineConfig,
    LaunchConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from cpserve.kv_transfer.config import KVTransferConfig

logger = logging.getLogger(__name__)

# vLLM flags for features that later releases of cpserve add: parsed (so a command line that
# carries them gets a clear answer) and refused at start-up.
NOT_YET_SUPPORTED: dict[str, tuple[str, str]] = {}

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
    async_scheduling: bool | None = None  # None: on CUDA, off on CPU (as vLLM)
    tensor_parallel_size: int = 1
    prefill_context_parallel_size: int = 1
    decode_context_parallel_size: int = 1
    cp_kv_cache_interleave_size: int = 1
    pcp_kv_exchange: str = "allgather"
    pcp_min_split_tokens: int = 0  # shorter prefill chunks run on every PCP rank, unsplit
    enable_expert_parallel: bool = False
    enforce_eager: bool = False
    load_format: str = "auto"
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    # vLLM's flags (see "Coming from vLLM" in the README for what each maps to).
    tokenizer: str | None = None
    trust_remote_code: bool = False
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] | None = None
    max_logprobs: int = 20
    compilation_config: dict[str, Any] | None = None
    optimization_level: int | None = None
    cudagraph_capture_sizes: list[int] | None = None
    distributed_executor_backend: str | None = None
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29501
    data_parallel_size: int = 1
    data_parallel_size_local: int | None = None
    data_parallel_start_rank: int | None = None
    data_parallel_rank: int | None = None
    data_parallel_address: str | None = None
    data_parallel_rpc_port: int | None = None
    speculative_config: dict[str, Any] | None = None
    kv_transfer_config: dict[str, Any] | None = None

    def create_engine_config(self) -> EngineConfig:
        from cpserve.engine.compilation import graph_settings
        from cpserve.engine.generation_defaults import read_sampling_defaults
        from cpserve.models.demo import resolve_model_path
        from cpserve.spec_decode.config import parse_speculative_config

        self._refuse_unsupported()
        if self.trust_remote_code:
            logger.warning("--trust-remote-code changes nothing: cpserve runs no code from "
                           "checkpoints (its model classes are built in)")
        graphs = graph_settings(self.compilation_config, self.optimization_level,
                                self.enforce_eager, self.cudagraph_capture_sizes)
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible")
        model_path = resolve_model_path(self.model)
        model = ModelConfig.from_pretrained(model_path, self.dtype, self.max_model_len,
                                            self.quantization,
                                            tokenizer=self._tokenizer_path())
        max_batched, threshold = self.step_budget(model.max_model_len)
        return EngineConfig(
            model=model,
            parallel=ParallelConfig(
                tensor_parallel_size=self.tensor_parallel_size,
                prefill_context_parallel_size=self.prefill_context_parallel_size,
                decode_context_parallel_size=self.decode_context_parallel_size,
                cp_kv_cache_interleave_size=self.cp_kv_cache_interleave_size,
                kv_exchange=self.pcp_kv_exchange,
                pcp_min_split_tokens=self.pcp_min_split_tokens,
                enable_expert_parallel=self.enable_expert_parallel,
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
                enable_chunked_prefill=self.enable_chunked_prefill,
                long_prefill_token_threshold=threshold,
                async_scheduling=self._async_scheduling(device),
            ),
            device=device,
            seed=self.seed,
            enforce_eager=graphs.enforce_eager,
            load_format=self.load_format,
            launch=LaunchConfig(nnodes=self.nnodes, node_rank=self.node_rank,
                                master_addr=self.master_addr, master_port=self.master_port,
                                executor_backend=self.distributed_executor_backend),
            cudagraph_capture_sizes=graphs.capture_sizes,
            max_logprobs=self.max_logprobs,
            sampling_defaults=read_sampling_defaults(self.generation_config, model_path,
                                                     self.override_generation_config),
            speculative=parse_speculative_config(self.speculative_config,
                                                 (self.model, str(model_path)),
                                                 model.hf_config),
            kv_transfer=(None if self.kv_transfer_config is None
                         else KVTransferConfig.from_json(self.kv_transfer_config)),
        )

    def _async_scheduling(self, device: str) -> bool:
        """As in vLLM: on by default, but not on the CPU, where nothing would overlap.

        Speculative decoding and KV transfer run with synchronous steps: the next step's
        drafts and its accepted tokens are known only once a step is finished, and the KV
        connector admits loaded requests and leases finished ones on finished steps. Left
        to its default, async scheduling is then off (logged once); asked for explicitly
        with either, it is refused."""
        features = [flag for flag, value in (("--speculative-config", self.speculative_config),
                                             ("--kv-transfer-config", self.kv_transfer_config))
                    if value is not None]
        if features and self.async_scheduling:
            raise ConfigError(f"--async-scheduling cannot be combined with {' and '.join(features)}: "
                              "cpserve runs these with synchronous steps; drop "
                              "--async-scheduling (or pass --no-async-scheduling)")
        if features:
            if self.async_scheduling is None and device == "cuda":
                logger.info("async scheduling is off: %s runs with synchronous steps",
                            " and ".join(features))
            return False
        return device == "cuda" if self.async_scheduling is None else self.async_scheduling

    def _tokenizer_path(self) -> str | None:
        from pathlib import Path

        from cpserve.models.demo import resolve_model_path

        if self.tokenizer is None:
            return None
        path = Path(resolve_model_path(self.tokenizer))
        if not any((path / name).is_file() for name in ("tokenizer.json",
                                                         "tokenizer_config.json")):
            raise ConfigError(f"--tokenizer {self.tokenizer!r} is not a directory with a "
                              "tokenizer.json or tokenizer_config.json (cpserve downloads "
                              "nothing: give a local directory)")
        return str(path)

    def _refuse_unsupported(self) -> None:
        """vLLM flags whose feature cpserve does not have: a start-up error that says so."""
        for name, (flag, feature) in NOT_YET_SUPPORTED.items():
            if getattr(self, name) is not None:
                raise ConfigError(f"{flag} is not supported yet: cpserve has no {feature} in "
                                  "this release; remove the flag")
        if self.data_parallel_size != 1:
            raise ConfigError(
                f"--data-parallel-size {self.data_parallel_size}: cpserve runs one engine "
                "replica per server, so only 1 is supported; for more replicas start one "
                "server each (with its own GPUs) behind a load balancer")
        for flag, value, single in (
                ("--data-parallel-size-local", self.data_parallel_size_local, 1),
                ("--data-parallel-start-rank", self.data_parallel_start_rank, 0),
                ("--data-parallel-rank", self.data_parallel_rank, 0)):
            if value is not None and value != single:
                raise ConfigError(f"{flag} {value}: with one data parallel replica "
                                  f"(--data-parallel-size 1) it can only be {single}")

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
        from cpserve.engine.kv_sizing import CPU_DEFAULT_KV_GIB
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
        g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                       default=True,
                       help="compute long prompts over several steps, beside other requests "
                            "(off: a prompt waits until it fits one step)")
        g.add_argument("--long-prefill-token-threshold", type=int, default=None,
                       help="most tokens one request computes in a step; 0: no cap (default: "
                            f"{DEFAULT_LONG_PREFILL_SHARE:g} of --max-num-batched-tokens with "
                            "chunked prefill, so a long prompt never takes a whole step)")
        g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="schedule and queue each step while the one before runs (default: "
                            "on with CUDA, off on CPU)")
        g.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
        g.add_argument("-pcp", "--prefill-context-parallel-size", type=int, default=1)
        g.add_argument("-dcp", "--decode-context-parallel-size", type=int, default=1)
        g.add_argument("--cp-kv-cache-interleave-size", type=int, default=1)
        g.add_argument("--pcp-kv-exchange", default="allgather", choices=["allgather", "ring"])
        g.add_argument("--pcp-min-split-tokens", type=int, default=0,
                       help="a request's prefill chunk shorter than this runs on every PCP rank "
                            "instead of being split over them (0: split whenever it can be)")
        g.add_argument("-ep", "--enable-expert-parallel", action="store_true",
                       help="MoE models: partition the routed experts over the tp * pcp ranks "
                            "(whole experts per rank) instead of slicing every expert over TP")
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
        _add_vllm_args(parser)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


def json_object(text: str) -> dict[str, Any]:
    """argparse type of vLLM's JSON flags (`--compilation-config '{"cudagraph_mode": ...}'`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _add_vllm_args(parser: argparse.ArgumentParser) -> None:
    """The rest of vLLM's engine flags: honoured, mapped onto cpserve's own, or refused at
    start-up with a message naming them (the README's "Coming from vLLM" lists which)."""
    g = parser.add_argument_group("vllm")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: the model's)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for vLLM command lines; cpserve runs no checkpoint code")
    g.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                   help="sampling defaults for fields a request leaves unset: 'auto' reads the "
                        "model's generation_config.json, 'vllm' uses vLLM's built-in "
                        "defaults, DIR reads DIR/generation_config.json")
    g.add_argument("--override-generation-config", type=json_object, default=None,
                   metavar="JSON",
                   help='sampling defaults set on top, e.g. {"temperature": 0.5}')
    g.add_argument("--max-logprobs", type=int, default=20,
                   help="most logprobs a request may ask for per token (-1: no limit)")
    g.add_argument("--compilation-config", "-cc", type=json_object, default=None,
                   metavar="JSON", help='CUDA graph settings: {"cudagraph_mode": '
                   '"FULL_DECODE_ONLY" | "NONE", "cudagraph_capture_sizes": [1, 2, 4]}')
    g.add_argument("-O", "--optimization-level", type=int, default=None, choices=range(4),
                   metavar="{0,1,2,3}",
                   help="-O0: no CUDA graphs; -O1 to -O3: decode CUDA graphs (the default)")
    g.add_argument("--cudagraph-capture-sizes", type=int, nargs="+", default=None,
                   metavar="N", help="batch sizes of the decode CUDA graphs")
    g.add_argument("--distributed-executor-backend", default=None,
                   choices=["mp", "uni", "external_launcher", "ray"],
                   help="mp: cpserve starts the ranks (default); external_launcher: torchrun "
                        "did; ray is refused")
    # vLLM's -n for --nnodes is left out: `cpserve generate -n` is the number of completions.
    g.add_argument("--nnodes", type=int, default=1,
                   help="nodes the ranks are spread over (without torchrun)")
    g.add_argument("--node-rank", "-r", type=int, default=0,
                   help="this node's index; node 0 serves the API, the others run --headless")
    g.add_argument("--master-addr", default="127.0.0.1",
                   help="address of node 0, where the ranks meet")
    g.add_argument("--master-port", type=int, default=29501,
                   help="port on node 0 where the ranks meet")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="engine replicas; only 1 is supported")
    g.add_argument("--data-parallel-size-local", "-dpl", type=int, default=None)
    g.add_argument("--data-parallel-start-rank", "-dpr", type=int, default=None)
    g.add_argument("--data-parallel-rank", "-dpn", type=int, default=None)
    g.add_argument("--data-parallel-address", "-dpa", default=None)
    g.add_argument("--data-parallel-rpc-port", "-dpp", type=int, default=None)
    g.add_argument("--speculative-config", type=json_object, default=None, metavar="JSON",
                   help='speculative decoding: {"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 4} or {"method": "deepseek_mtp", '
                        '"num_speculative_tokens": 3}')
    g.add_argument("--kv-transfer-config", type=json_object, default=None, metavar="JSON",
                   help='prefill/decode disaggregation: {"kv_connector": "CpserveConnector", '
                        '"kv_role": "kv_producer" | "kv_consumer" | "kv_both", "kv_ip": ..., '
                        '"kv_port": ..., "kv_load_failure_policy": "fail" | "recompute"}')
