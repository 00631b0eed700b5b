"""The same-host device path: a decode rank maps the prefill rank's KV cache through CUDA IPC
and copies blocks GPU to GPU (the same GPU, or another over NVLink), with no host copy.

It is chosen when both ranks run on CUDA on one host (same boot id) and the prefill rank's
GPU is visible to the decode rank (matched by UUID, whatever CUDA_VISIBLE_DEVICES numbers
it); otherwise, or if mapping fails, KV goes over TCP. What crosses the socket is plain data:
the IPC handle bytes and sizes that torch's own CUDA tensor sharing uses, in msgpack.
"""

from __future__ import annotations

import socket
from functools import cache

import torch

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16,
                               getattr(torch, "float8_e4m3fn", torch.float32))}


@cache
def host_id() -> str:
    """This machine: two processes with the same id share GPUs and memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def gpu_uuid(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device).uuid)


def local_device_of(uuid: str) -> torch.device | None:
    """The CUDA device of this process with that UUID, if it can see it."""
    if not torch.cuda.is_available():
        return None
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == uuid:
            return torch.device("cuda", index)
    return None


def export_tensor(tensor: torch.Tensor) -> dict:
    """What another process needs to map `tensor` (a whole CUDA allocation's view)."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(tensor)
    (_, size, stride, offset, _, dtype, device, handle, storage_bytes, storage_offset, _,
     ref_handle, ref_offset, event_handle, event_sync) = args
    return {"size": list(size), "stride": list(stride), "offset": int(offset),
            "dtype": str(dtype), "device": int(device), "handle": bytes(handle),
            "storage_bytes": int(storage_bytes), "storage_offset": int(storage_offset),
            "ref_handle": bytes(ref_handle), "ref_offset": int(ref_offset),
            "event_handle": bytes(event_handle) if event_handle else b"",
            "event_sync": bool(event_sync)}


def import_tensor(spec: dict, device: torch.device) -> torch.Tensor:
    """Map a tensor exported by another process of this host onto `device` (its GPU here)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    dtype = _DTYPES.get(spec["dtype"])
    if dtype is None:
        raise ValueError(f"cannot map a KV cache of dtype {spec['dtype']}")
    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size(spec["size"]), tuple(spec["stride"]), spec["offset"],
        torch.UntypedStorage, dtype, device.index, spec["handle"], spec["storage_bytes"],
        spec["storage_offset"], False, spec["ref_handle"], spec["ref_offset"],
        spec["event_handle"] or None, spec["event_sync"])


def export_caches(kv_caches: list) -> list[list[dict | None]]:
    return [[export_tensor(t) if t is not None else None for t in pair] for pair in kv_caches]


def import_caches(specs: list, device: torch.device) -> list[tuple]:
    return [tuple(import_tensor(s, device) if s is not None else None for s in pair)
            for pair in specs]
