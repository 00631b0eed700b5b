"""What one token's KV looks like on one rank, as the model says (per layer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    num_heads: int  # KV heads this rank stores
    k_dim: int
    v_dim: int | None  # None: the values are the keys' first channels (MLA's latent cache)
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token in one layer."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return self.num_heads * (self.k_dim + (self.v_dim or 0)) * elem

    def allocate(self, num_blocks: int, block_size: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One layer's (k_cache, v_cache), zeroed so unwritten slots never hold NaN."""
        k = torch.zeros(num_blocks, block_size, self.num_heads, self.k_dim, dtype=self.dtype,
                        device=device)
        v = None if self.v_dim is None else torch.zeros(
            num_blocks, block_size, self.num_heads, self.v_dim, dtype=self.dtype, device=device)
        return k, v
