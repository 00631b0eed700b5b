"""vLLM's graph flags (`--compilation-config` / `-cc`, `-O`) mapped onto what cpserve does.

cpserve has one kind of graph: decode steps replayed from CUDA graphs, one per batch-size
bucket (`engine/cuda_graphs.py`), or none with `--enforce-eager`. It does not torch.compile.

    vLLM                                     cpserve
    cudagraph_mode FULL_DECODE_ONLY          decode graphs (what cpserve does by default)
    cudagraph_mode NONE, -O0                 no graphs, as --enforce-eager
    cudagraph_mode PIECEWISE / FULL /        refused: cpserve has no graphs of prefill or
      FULL_AND_PIECEWISE                       mixed prefill-decode steps
    -O1, -O2, -O3                            decode graphs: the most cpserve does
    cudagraph_capture_sizes [1, 2, 4]        the decode graph buckets
    max_cudagraph_capture_size N             buckets above N left out
    mode / level 0 or "NONE"                 accepted (nothing is compiled); other values refused

As in vLLM, explicit settings win over the -O level, and --enforce-eager wins over both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cpserve.config import ConfigError

CUDAGRAPH_MODES = ("NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")
SUPPORTED_CUDAGRAPH_MODES = ("FULL_DECODE_ONLY", "NONE")
# The decode graph buckets when nothing else is asked for (capped by max_num_seqs).
DEFAULT_CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
_KEYS = ("cudagraph_mode", "cudagraph_capture_sizes", "max_cudagraph_capture_size", "mode",
         "level")


@dataclass(frozen=True)
class GraphSettings:
    enforce_eager: bool
    capture_sizes: tuple[int, ...] | None  # None: DEFAULT_CAPTURE_SIZES up to max_num_seqs


def graph_settings(compilation_config: dict[str, Any] | None, optimization_level: int | None,
                   enforce_eager: bool, capture_sizes: list[int] | None) -> GraphSettings:
    if compilation_config is not None and not isinstance(compilation_config, dict):
        raise ConfigError(f"compilation_config={compilation_config!r} must be a dict (a JSON "
                          "object on the command line)")
    if optimization_level not in (None, 0, 1, 2, 3):
        raise ConfigError(f"optimization_level (-O) {optimization_level!r} must be 0, 1, 2 or 3")
    cc = dict(compilation_config or {})
    unknown = sorted(set(cc) - set(_KEYS))
    if unknown:
        raise ConfigError(f"--compilation-config key {unknown[0]!r} is not supported: cpserve "
                          f"honours {', '.join(_KEYS[:3])} (and mode/level 0, since it "
                          "compiles nothing)")
    for key in ("mode", "level"):
        if key in cc and cc[key] not in (0, None, "NONE", "0"):
            raise ConfigError(f"--compilation-config {key}={cc[key]!r}: cpserve does not "
                              f"torch.compile models; only {key} 0 (NONE) is supported (its "
                              "CUDA graphs are set by cudagraph_mode)")
    mode = cc.get("cudagraph_mode")
    if mode is not None:
        mode = str(mode).upper()
        if mode not in CUDAGRAPH_MODES:
            raise ConfigError(f"--compilation-config cudagraph_mode={cc['cudagraph_mode']!r} "
                              f"is not one of vLLM's modes {', '.join(CUDAGRAPH_MODES)}")
        if mode not in SUPPORTED_CUDAGRAPH_MODES:
            raise ConfigError(
                f"--compilation-config cudagraph_mode={mode}: cpserve captures CUDA graphs "
                "of decode steps only (no piecewise graphs, no graphs of prefill or mixed "
                f"steps); supported: {' (the default), '.join(SUPPORTED_CUDAGRAPH_MODES)}")
    elif optimization_level == 0:
        mode = "NONE"
    sizes = _capture_sizes(cc, capture_sizes)
    return GraphSettings(enforce_eager=enforce_eager or mode == "NONE", capture_sizes=sizes)


def _capture_sizes(cc: dict[str, Any], flag_sizes: list[int] | None) -> tuple[int, ...] | None:
    sizes = cc.get("cudagraph_capture_sizes")
    if sizes is not None and flag_sizes is not None and list(sizes) != list(flag_sizes):
        raise ConfigError("--cudagraph-capture-sizes and --compilation-config "
                          "cudagraph_capture_sizes disagree; give one of them")
    sizes = sizes if sizes is not None else flag_sizes
    largest = cc.get("max_cudagraph_capture_size")
    if sizes is not None and (not isinstance(sizes, list)
                              or any(type(n) is not int or n < 1 for n in sizes) or not sizes):
        raise ConfigError(f"cudagraph_capture_sizes={sizes!r} must be a non-empty list of "
                          "positive batch sizes")
    if largest is not None:
        if type(largest) is not int or largest < 1:
            raise ConfigError(f"--compilation-config max_cudagraph_capture_size={largest!r} "
                              "must be a positive integer")
        sizes = [n for n in (sizes or DEFAULT_CAPTURE_SIZES) if n <= largest] or [largest]
    return None if sizes is None else tuple(sorted(set(sizes)))


def decode_graph_buckets(capture_sizes: tuple[int, ...] | None, max_num_seqs: int) -> list[int]:
    """Batch sizes that get a decode graph; a batch runs in the smallest bucket that holds it,
    and batches above the last one run eagerly.

    Without explicit sizes: the default list up to max_num_seqs, which is always a bucket.
    """
    if capture_sizes is not None:
        return list(capture_sizes)
    largest = min(max_num_seqs, DEFAULT_CAPTURE_SIZES[-1])
    return [b for b in DEFAULT_CAPTURE_SIZES if b < largest] + [largest]
