"""How many KV blocks a rank gets: explicit, from a memory size, or what GPU memory leaves
after a profiling step of the largest step the scheduler can plan."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch

from cpserve.distributed.plan import PlannedRequest, StepPlan

if TYPE_CHECKING:
    from cpserve.engine.model_runner import ModelRunner

CPU_DEFAULT_KV_GIB = 0.25
PROFILE_REQUEST_ID = "__cpserve_profile__"


def decide_num_blocks(runner: ModelRunner) -> int:
    """Blocks per rank; every rank takes the minimum so that block ids mean the same
    everywhere."""
    cache = runner.config.cache
    if cache.num_blocks is not None:
        return cache.num_blocks
    if cache.kv_cache_memory_gib is not None:
        budget = cache.kv_cache_memory_gib * 2**30
    elif runner.device.type == "cuda":
        budget = profile_kv_budget(runner)
    else:
        budget = CPU_DEFAULT_KV_GIB * 2**30
    # Too small a budget gives 0 blocks, which the engine refuses naming the flags.
    blocks = torch.tensor([int(budget // runner.bytes_per_block)])
    if runner.groups.cpu_group is not None:
        torch.distributed.all_reduce(blocks, torch.distributed.ReduceOp.MIN,
                                     group=runner.groups.cpu_group)
    return int(blocks.item())


def profile_kv_budget(runner: ModelRunner) -> float:
    """Bytes left for the KV cache: run the largest step the scheduler can plan (one prompt
    of max_num_batched_tokens) with a cache just big enough for it, and take the peak memory
    it needed.

        total * gpu_memory_utilization
          - what this process holds outside torch's allocator (NCCL buffers, ...)
          - peak of this process's tensors during the step (weights + activations)

    Memory other processes held when this one started is not this instance's to count (two
    instances of 0.4 share a GPU, as with vLLM, prefill and decode of a disaggregated pair),
    but the cache must fit in what is free: if it does not, it gets what is free.
    """
    config, device = runner.config, runner.device
    tokens = min(config.scheduler.max_num_batched_tokens, config.model.max_model_len - 1)
    blocks = runner.layout.num_blocks_for(tokens)  # within a max_model_len request's row
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    runner.kv_caches = [runner.kv_spec.allocate(blocks, config.cache.block_size, device)
                        for _ in range(runner.num_cache_layers)]
    cache_bytes = blocks * runner.bytes_per_block
    plan = StepPlan([PlannedRequest(PROFILE_REQUEST_ID, [0] * tokens, 0, list(range(blocks)),
                                    True, 1)])
    runner.execute(plan, use_graphs=False)
    torch.cuda.synchronize(device)
    runner.rows.remove(PROFILE_REQUEST_ID)
    if runner.drafter is not None:
        runner.drafter.forget()
    peak = torch.cuda.max_memory_allocated(device) - cache_bytes
    runner.kv_caches = []
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    held_by_others = total - free - torch.cuda.memory_reserved(device)
    outside_torch = max(0, held_by_others - runner.gpu_used_at_start)
    budget = total * config.cache.gpu_memory_utilization - outside_torch - peak
    activations = peak - torch.cuda.memory_allocated(device)
    budget = min(budget, free - activations)
    if budget <= 0:
        raise RuntimeError(
            f"no GPU memory left for the KV cache: a step of {tokens} tokens peaks at "
            f"{peak / 2**30:.1f} GiB, others hold {held_by_others / 2**30:.1f} GiB of "
            f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free); raise "
            f"--gpu-memory-utilization ({config.cache.gpu_memory_utilization}) or lower "
            "--max-num-batched-tokens")
    runner.profiled_kv_budget = budget
    runner.profile_report = (f"profiled a {tokens}-token step: peak {peak / 2**30:.2f} GiB, "
                             f"others {held_by_others / 2**30:.2f} GiB, KV budget "
                             f"{budget / 2**30:.2f} GiB")
    print(f"cpserve rank {runner.groups.rank}: {runner.profile_report}", file=sys.stderr,
          flush=True)
    return budget


def gpu_used(device: torch.device) -> int:
    """Bytes in use on the device's GPU (by any process), 0 off CUDA."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free
