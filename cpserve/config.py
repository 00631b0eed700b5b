"""Engine configuration: frozen dataclasses, every start-up rule checked in `EngineConfig`.

Nothing mutates a config after start-up. Values that follow from others (world size, number
of KV shards, the virtual block size) are properties, never stored twice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cpserve.quantization.config import QuantizationConfig
    from cpserve.spec_decode.config import SpeculativeConfig

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM",
                           "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")
# vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN: run past the model's positions, knowingly.
ALLOW_LONG_ENV = "CPSERVE_ALLOW_LONG_MAX_MODEL_LEN"


class ConfigError(ValueError):
    """An invalid setting or flag combination, found at start-up."""


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """Rope settings from either transformers v5 (`rope_parameters`) or v4 (`rope_scaling`)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params


@dataclass(frozen=True)
class ModelConfig:
    """The model's shape, read from the checkpoint's config.json."""

    path: str
    architecture: str
    hf_config: dict[str, Any] = field(repr=False, compare=False, hash=False)
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    tokenizer: str = ""  # the tokenizer's directory: the checkpoint's unless --tokenizer
    quantization: str | None = None  # the --quantization flag, as given
    # What the engine runs, from the checkpoint's quantization_config and the flag.
    quant_config: QuantizationConfig | None = field(default=None, compare=False)

    @staticmethod
    def from_pretrained(path: str | Path, dtype: str | torch.dtype = "auto",
                        max_model_len: int | None = None,
                        quantization: str | None = None,
                        tokenizer: str | None = None) -> ModelConfig:
        from cpserve.quantization.config import resolve_quantization

        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"model path {str(path)!r} has no config.json: not a Hugging Face "
                              "checkpoint directory (or the built-in demo model name 'tiny')")
        hf = json.loads(config_file.read_text())
        architectures = hf.get("architectures") or []
        arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(f"model architecture {architectures} is not supported; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if max_model_len is None:
            max_model_len = int(hf.get("max_position_embeddings", 2048))
        longest = _longest_context(hf)
        if int(max_model_len) > longest and os.environ.get(ALLOW_LONG_ENV) != "1":
            raise ConfigError(
                f"max_model_len={max_model_len} is longer than the {longest} positions this "
                f"model was made for (max_position_embeddings="
                f"{hf.get('max_position_embeddings')}, rope scaling "
                f"{_rope_parameters(hf)['rope_type']}): outputs past them are wrong. Lower "
                f"--max-model-len, or set {ALLOW_LONG_ENV}=1 to run that long anyway")
        return ModelConfig(
            path=str(path),
            architecture=arch,
            hf_config=hf,
            dtype=_resolve_dtype(dtype, hf),
            max_model_len=int(max_model_len),
            eos_token_ids=_eos_token_ids(path, hf),
            tokenizer=str(tokenizer) if tokenizer is not None else str(path),
            quantization=quantization,
            quant_config=resolve_quantization(hf, quantization),
        )

    # Shape, read through properties so the raw dict stays the single source.
    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])

    @property
    def hidden_size(self) -> int:
        return int(self.hf_config["hidden_size"])

    @property
    def num_layers(self) -> int:
        return int(self.hf_config["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.hf_config["num_attention_heads"])

    @property
    def num_kv_heads(self) -> int:
        """KV heads in the cache; 1 for MLA, whose config's num_key_value_heads counts the
        heads that the latent expands to."""
        if self.is_mla:
            return 1
        return int(self.hf_config.get("num_key_value_heads") or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self.hf_config.get("head_dim") or self.hidden_size // self.num_heads)

    @property
    def is_mla(self) -> bool:
        """Multi-head latent attention: one latent KV vector per token, shared by all heads."""
        return "kv_lora_rank" in self.hf_config

    @property
    def rope(self) -> dict[str, Any]:
        return _rope_parameters(self.hf_config)

    @property
    def num_experts(self) -> int:
        """Routed experts of a mixture-of-experts layer; 0 for dense models. DeepSeek names
        them `n_routed_experts`, Qwen-MoE `num_experts` (transformers 5 writes
        `num_local_experts`)."""
        hf = self.hf_config
        return int(hf.get("n_routed_experts") or hf.get("num_experts")
                   or hf.get("num_local_experts") or 0)

    @property
    def shared_expert_intermediate_size(self) -> int:
        """Width of the always-on experts' MLP: DeepSeek's n_shared_experts stacked, or
        Qwen2-MoE's shared expert; 0 when there is none."""
        hf = self.hf_config
        if hf.get("shared_expert_intermediate_size"):
            return int(hf["shared_expert_intermediate_size"])
        return int(hf.get("n_shared_experts") or 0) * int(hf.get("moe_intermediate_size") or 0)


def _longest_context(hf: dict[str, Any]) -> int:
    """The longest context the checkpoint supports, derived as vLLM derives it:
    max_position_embeddings, stretched by a rope scaling that extends it (yarn from its
    original length times the factor, linear and dynamic by the factor); llama3 and longrope
    checkpoints already give the extended length."""
    longest = int(hf.get("max_position_embeddings", 2048))
    rope = _rope_parameters(hf)
    factor = rope.get("factor")
    if factor and rope["rope_type"] in ("yarn", "linear", "dynamic"):
        if rope["rope_type"] == "yarn" and rope.get("original_max_position_embeddings"):
            longest = int(rope["original_max_position_embeddings"])
        longest = int(longest * float(factor))
    return longest


def _resolve_dtype(dtype: str | torch.dtype, hf: dict[str, Any]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        return _DTYPES.get(str(name).replace("torch.", ""), torch.float32)
    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def _eos_token_ids(path: Path, hf: dict[str, Any]) -> tuple[int, ...]:
    """EOS ids from generation_config.json, falling back to config.json."""
    eos = None
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
    if eos is None:
        eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


@dataclass(frozen=True)
class ParallelConfig:
    """Layout of ranks. See DESIGN.md, "Rank layout".

    `kv_exchange` picks how PCP ranks share K/V during prefill: "allgather" or "ring".
    """

    tensor_parallel_size: int = 1
    prefill_context_parallel_size: int = 1
    decode_context_parallel_size: int = 1
    cp_kv_cache_interleave_size: int = 1
    kv_exchange: str = "allgather"
    # Prefill chunks shorter than this run replicated on every PCP rank instead of split.
    pcp_min_split_tokens: int = 0
    # Routed experts partitioned over the tp * pcp ranks (whole experts per rank) instead of
    # every rank holding a TP slice of each (vLLM's --enable-expert-parallel).
    enable_expert_parallel: bool = False

    @property
    def tp(self) -> int:
        return self.tensor_parallel_size

    @property
    def pcp(self) -> int:
        return self.prefill_context_parallel_size

    @property
    def dcp(self) -> int:
        return self.decode_context_parallel_size

    @property
    def world_size(self) -> int:
        return self.tp * self.pcp

    @property
    def num_kv_shards(self) -> int:
        """C: KV shards of one request."""
        return self.pcp * self.dcp

    @property
    def interleave(self) -> int:
        return self.cp_kv_cache_interleave_size

    @property
    def min_split_tokens(self) -> int:
        """Fewest new tokens of a request for its prefill to be split across PCP ranks."""
        return max(self.pcp_min_split_tokens, 2 * self.pcp)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. `num_blocks` is per rank; every rank has the same count and ids."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_gib: float | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "fp8" / "fp8_e4m3": e4m3

    @property
    def fp8_kv(self) -> bool:
        return self.kv_cache_dtype in FP8_KV_CACHE_DTYPES


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_waiting_requests: int = 4096
    # vLLM's meanings. Chunked prefill: a prompt may be computed over several steps, beside
    # the decodes of others; without it a prompt waits until the whole of it fits a step.
    enable_chunked_prefill: bool = True
    # A request computes at most this many tokens in one step (0: no cap beyond the step
    # budget), so a long prefill leaves room for decodes and new requests in every step.
    long_prefill_token_threshold: int = 0
    # vLLM's async scheduling: step n+1 is scheduled and queued while step n runs, its
    # decodes fed by step n's samples on the device (engine/llm_engine.py).
    async_scheduling: bool = False


@dataclass(frozen=True)
class LaunchConfig:
    """Where the ranks of a layout run: one node, several nodes, or as torchrun started them.

    With `nnodes = N`, the `world_size` ranks are split evenly, node `r` running global ranks
    `[r * per_node, (r + 1) * per_node)`; node 0 holds rank 0 (the driver) and the rendezvous
    store at `master_addr:master_port`. `executor_backend` is vLLM's
    `--distributed-executor-backend`: None picks by itself (torchrun's environment, else "mp").
    """

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29501
    executor_backend: str | None = None

    def ranks_per_node(self, world_size: int) -> int:
        return world_size // self.nnodes

    def local_ranks(self, world_size: int) -> range:
        """Global ranks that run on this node."""
        per_node = self.ranks_per_node(world_size)
        return range(self.node_rank * per_node, (self.node_rank + 1) * per_node)


EXECUTOR_BACKENDS = ("mp", "uni", "external_launcher")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    parallel: ParallelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: str = "cpu"
    seed: int = 0
    enforce_eager: bool = False  # no CUDA graphs
    load_format: str = "auto"  # "dummy": random weights made on the device (benchmarks)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    # Decode CUDA graph batch sizes (vLLM's cudagraph_capture_sizes); None: the built-in list.
    cudagraph_capture_sizes: tuple[int, ...] | None = None
    # Most logprobs a request may ask for, per token (vLLM's --max-logprobs; -1: the vocabulary).
    max_logprobs: int = 20
    # Sampling fields a request leaves unset take these values (from generation_config.json,
    # as vLLM's --generation-config auto does): temperature, top_p, top_k, min_p,
    # repetition_penalty, max_tokens (from max_new_tokens, a cap for every request).
    sampling_defaults: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # Speculative decoding (vLLM's --speculative-config), None when off.
    speculative: SpeculativeConfig | None = None
    # --kv-transfer-config (prefill/decode disaggregation); a KVTransferConfig, None: off.
    kv_transfer: Any = None

    def __post_init__(self) -> None:
        check_engine_config(self)

    @property
    def virtual_block_size(self) -> int:
        """Tokens covered by one block-table entry: B * C."""
        return self.cache.block_size * self.parallel.num_kv_shards


def check_engine_config(cfg: EngineConfig) -> None:
    """Every start-up rule of DESIGN.md, each failure naming the flag and the rule."""
    par, cache, sched, model = cfg.parallel, cfg.cache, cfg.scheduler, cfg.model
    for name, value in (
        ("tensor_parallel_size", par.tp),
        ("prefill_context_parallel_size", par.pcp),
        ("decode_context_parallel_size", par.dcp),
        ("cp_kv_cache_interleave_size", par.interleave),
        ("block_size", cache.block_size),
        ("max_num_seqs", sched.max_num_seqs),
        ("max_num_batched_tokens", sched.max_num_batched_tokens),
        ("max_model_len", model.max_model_len),
    ):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    threshold = sched.long_prefill_token_threshold
    if not isinstance(threshold, int) or threshold < 0:
        raise ConfigError(f"long_prefill_token_threshold={threshold!r} must be an integer >= 0 "
                          "(0: no cap)")
    if not sched.enable_chunked_prefill:
        if sched.max_num_batched_tokens < model.max_model_len:
            raise ConfigError(
                f"max_num_batched_tokens={sched.max_num_batched_tokens} is smaller than "
                f"max_model_len={model.max_model_len}: without chunked prefill every prompt must "
                "fit one step; raise --max-num-batched-tokens, lower --max-model-len or drop "
                "--no-enable-chunked-prefill")
        if threshold > 0:
            raise ConfigError(
                f"long_prefill_token_threshold={threshold} chunks long prompts, which "
                "--no-enable-chunked-prefill forbids: set one or the other")
    if par.kv_exchange not in ("allgather", "ring"):
        raise ConfigError(f"kv_exchange={par.kv_exchange!r} must be 'allgather' or 'ring'")
    split = par.pcp_min_split_tokens
    if isinstance(split, bool) or not isinstance(split, int) or split < 0:
        raise ConfigError(f"pcp_min_split_tokens={split!r} must be an integer >= 0 "
                          "(--pcp-min-split-tokens)")
    if cache.block_size % par.interleave:
        raise ConfigError(f"cp_kv_cache_interleave_size={par.interleave} must divide "
                          f"block_size={cache.block_size}")
    if model.num_heads % par.tp:
        raise ConfigError(f"tensor_parallel_size={par.tp} must divide num_attention_heads="
                          f"{model.num_heads}")
    kv = model.num_kv_heads
    if model.is_mla:
        # The latent is replicated on every TP rank; DCP turns the copies into shards.
        if par.tp % par.dcp:
            raise ConfigError(f"decode_context_parallel_size={par.dcp} must divide "
                              f"tensor_parallel_size={par.tp} for this MLA model")
    elif par.tp >= kv:
        if par.tp % kv:
            raise ConfigError(f"num_key_value_heads={kv} must divide tensor_parallel_size="
                              f"{par.tp} when tensor_parallel_size > num_key_value_heads")
        replicas = par.tp // kv
        if replicas % par.dcp:
            raise ConfigError(
                f"decode_context_parallel_size={par.dcp} must divide tensor_parallel_size // "
                f"num_key_value_heads = {par.tp} // {kv} = {replicas} for this GQA model")
    else:
        if kv % par.tp:
            raise ConfigError(f"tensor_parallel_size={par.tp} must divide num_key_value_heads={kv}")
        if par.dcp != 1:
            raise ConfigError(
                f"decode_context_parallel_size={par.dcp} must be 1 when tensor_parallel_size="
                f"{par.tp} < num_key_value_heads={kv}: no rank holds a copy of another's KV heads")
    hf = model.hf_config
    if hf.get("use_sliding_window") or any(t != "full_attention"
                                           for t in hf.get("layer_types") or []):
        raise ConfigError("use_sliding_window / layer_types: sliding-window attention is not "
                          "supported, only full attention")
    _check_mlp_shapes(model, par)
    if cache.num_blocks is not None and cache.num_blocks < 1:
        raise ConfigError(f"num_blocks={cache.num_blocks} must be >= 1")
    if cache.kv_cache_memory_gib is not None and cache.kv_cache_memory_gib <= 0:
        raise ConfigError(f"kv_cache_memory={cache.kv_cache_memory_gib} GiB must be > 0")
    if not 0 < cache.gpu_memory_utilization <= 1:
        raise ConfigError(f"gpu_memory_utilization={cache.gpu_memory_utilization} must be in (0, 1]")
    if cache.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ConfigError(f"kv_cache_dtype={cache.kv_cache_dtype!r} is not supported: 'auto' "
                          "keeps the model's dtype, 'fp8' (= 'fp8_e4m3') caches e4m3 with "
                          "per-tensor scales")
    if cfg.load_format not in ("auto", "dummy"):
        raise ConfigError(f"load_format={cfg.load_format!r} must be 'auto' or 'dummy'")
    if cfg.device not in ("cpu", "cuda"):
        raise ConfigError(f"device={cfg.device!r} must be 'cpu', 'cuda' or 'auto'")
    _check_launch(cfg.launch, par)
    if cfg.kv_transfer is not None:
        from cpserve.kv_transfer.config import check_kv_transfer

        check_kv_transfer(cfg.kv_transfer, cfg.launch.nnodes, par.world_size)
    sizes = cfg.cudagraph_capture_sizes
    if sizes is not None and (not sizes or any(not isinstance(n, int) or n < 1 for n in sizes)):
        raise ConfigError(f"cudagraph_capture_sizes={list(sizes)} must be a non-empty list of "
                          "positive batch sizes")
    if not isinstance(cfg.max_logprobs, int) or cfg.max_logprobs < -1:
        raise ConfigError(f"--max-logprobs {cfg.max_logprobs!r} must be -1 (the whole "
                          "vocabulary) or a non-negative integer")
    if cfg.speculative is not None:
        cfg.speculative.check(cfg)  # its rules live with it, in spec_decode/config.py


def check_kv_capacity(cfg: EngineConfig, num_blocks: int) -> None:
    """The start-up rule that needs the cache's size, known once the model runner decided it:
    one request of `max_model_len` tokens must fit, or it could never finish (vLLM refuses
    such a configuration at start-up too)."""
    capacity = num_blocks * cfg.virtual_block_size
    max_len = cfg.model.max_model_len
    if max_len > capacity:
        raise ConfigError(
            f"max_model_len={max_len} does not fit in the KV cache, which holds {capacity} "
            f"tokens ({num_blocks} blocks of {cfg.virtual_block_size} tokens): a request of "
            f"max_model_len tokens could never finish. Lower --max-model-len to at most "
            f"{capacity}, or give the KV cache more room with --num-kv-blocks, "
            "--kv-cache-memory (CPU) or --gpu-memory-utilization (GPU)")


def _check_launch(launch: LaunchConfig, par: ParallelConfig) -> None:
    if launch.executor_backend == "ray":
        raise ConfigError("--distributed-executor-backend ray: cpserve has no Ray executor; "
                          "use mp (cpserve starts the ranks, on several nodes with --nnodes) or "
                          "external_launcher (ranks started by torchrun)")
    if launch.executor_backend not in (None, *EXECUTOR_BACKENDS):
        raise ConfigError(f"--distributed-executor-backend {launch.executor_backend!r} must be "
                          f"one of {', '.join(EXECUTOR_BACKENDS)}")
    if launch.executor_backend == "uni" and par.world_size > 1:
        raise ConfigError(f"--distributed-executor-backend uni runs one process, but "
                          f"tensor_parallel_size * prefill_context_parallel_size = "
                          f"{par.world_size}; use mp")
    if not isinstance(launch.nnodes, int) or launch.nnodes < 1:
        raise ConfigError(f"--nnodes {launch.nnodes!r} must be a positive integer")
    if not isinstance(launch.node_rank, int) or not 0 <= launch.node_rank < launch.nnodes:
        raise ConfigError(f"--node-rank {launch.node_rank!r} must be in [0, --nnodes "
                          f"{launch.nnodes})")
    if par.world_size % launch.nnodes:
        raise ConfigError(f"tensor_parallel_size * prefill_context_parallel_size = "
                          f"{par.world_size} ranks cannot be split evenly over --nnodes "
                          f"{launch.nnodes}")
    if launch.nnodes > 1 and launch.executor_backend in ("uni", "external_launcher"):
        raise ConfigError(f"--nnodes {launch.nnodes} starts ranks on several nodes itself (the "
                          f"mp backend); with --distributed-executor-backend "
                          f"{launch.executor_backend} leave --nnodes at 1 (torchrun takes "
                          "the node flags)")
    if not 0 < launch.master_port < 65536:
        raise ConfigError(f"--master-port {launch.master_port} must be in [1, 65535]")


def check_server_flags(api_server_count: int, headless: bool, node_rank: int) -> None:
    """`cpserve serve` flags about its processes (vLLM's --api-server-count, --headless)."""
    if api_server_count != 1:
        raise ConfigError(f"--api-server-count {api_server_count}: cpserve runs one API server "
                          "process per engine; only 1 is supported")
    if headless and node_rank == 0:
        raise ConfigError("--headless is for the nodes other than node 0 (--node-rank 1 and "
                          "up): node 0 runs the driver and serves the API")
    if not headless and node_rank != 0:
        raise ConfigError(f"--node-rank {node_rank}: only node 0 serves the API; start this "
                          "node with --headless")


def _check_mlp_shapes(model: ModelConfig, par: ParallelConfig) -> None:
    """TP slices every dense MLP, shared expert and (without expert parallelism) routed
    expert into equal parts; expert parallelism gives each rank whole experts instead."""
    hf = model.hf_config
    sizes = {"intermediate_size": hf.get("intermediate_size")}
    if not par.enable_expert_parallel:
        sizes["moe_intermediate_size"] = hf.get("moe_intermediate_size")
    sizes["the shared experts' intermediate size"] = model.shared_expert_intermediate_size
    for key, size in sizes.items():
        if size and int(size) % par.tp:
            raise ConfigError(f"tensor_parallel_size={par.tp} must divide {key}={size}: "
                              "each rank holds an equal slice of every MLP and expert")
    if not par.enable_expert_parallel:
        return
    experts = model.num_experts
    if not experts:
        raise ConfigError(f"enable_expert_parallel: {model.architecture} has no experts to "
                          "partition")
    if experts % par.world_size:
        raise ConfigError(f"enable_expert_parallel: tensor_parallel_size * "
                          f"prefill_context_parallel_size = {par.world_size} must divide the "
                          f"{experts} routed experts (each rank holds an equal share)")
