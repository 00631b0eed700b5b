"""Host values to the device without waiting for the device.

A blocking host-to-device copy (`torch.tensor(values, device="cuda")`, indexing a CUDA
tensor with a Python list) synchronises the stream: it waits for every kernel queued before
it, which with async scheduling is the next step's whole forward pass. The step path moves
host values only through `to_device` (pinned memory, asynchronous copy) and indexes with
device tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence | torch.Tensor, device: torch.device,
              dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`values` (a host tensor or a list) on `device`, queued, not waited for. The pinned
    staging memory comes from PyTorch's caching host allocator, which does not hand it out
    again before the copy has run."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def take_rows(tensor: torch.Tensor, index: list[int]) -> torch.Tensor:
    """`tensor[index]` for a host list of rows: no copy when it is every row in order, else
    a gather by a device index."""
    if index == list(range(tensor.shape[0])):
        return tensor
    return tensor.index_select(0, to_device(index, tensor.device))
