"""How a layer's queries meet the cached KV and the step's new KV: the attention *forms*.

The attention context runs two kinds of attention for each query (context.py): over the new
tokens of its step (dense, from the step's own keys and values) and over the tokens cached
before it (paged, from the KV cache). Most models use the same q, k, v for both (`SAME_FORMS`).
MLA caches one latent per token and can attend to it in two forms, equal in exact arithmetic
(see deepseek_v2.py for the math):

    absorbed  query [q_nope W_UK, q_rope] (L + R wide) against the cache's [c, kr] as it is;
              the output is in latent space (L), taken to values by W_UV afterwards.
    expanded  query [q_nope, q_rope] (nope + R) against per-head keys [c W_UK_h, kr] and
              values c W_UV_h, up-projected from the step's latents: 3.4x fewer FLOPs per
              (query, key, head) for DeepSeek's shapes (2 * (192 + 128) against
              2 * (576 + 512)), and head dims (192 / 128) that cuDNN and FlashAttention take.

`LatentForms` mixes them: the context gets the expanded query and the latent keys; the dense
part over new tokens is expanded (`new_kv` up-projects the latents after the PCP exchange, so
only the latent travels and is cached). The cached prefix is read in one of two ways:

  expanded prefix  (`expand_prefix`, without DCP: sharded.py) the backend gathers the prefix's
                   latents and expands them like new tokens (`new_kv`, or `expand_into` a
                   workspace), then attends non-causally with the library ops: a chunk of
                   thousands of queries over thousands of cached tokens is a large GEMM-shaped
                   attention at head dim 192, which the absorbed form (576 against one latent
                   head) turns into 3.4x the FLOPs in the slower paged kernel;
  absorbed prefix  the paged call gets `cached_query(q)` and its output goes through
                   `cached_output` to value space before the LSE merge (the merge is linear
                   in the outputs, so merging after the projection is exact). Decodes, DCP
                   and rows of small groups (the backend's choice) read the prefix this way.

    forms            dense over new tokens          over the cache
    SAME_FORMS       q . k,  values v               q . k_cache, values v_cache
    LatentForms      q . expand_k(c), expand_v(c)   absorb(q) . [c, kr], then * W_UV
                                                    or q . expand_k(c), expand_v(c) (prefix)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class SameForms:
    """The queries, keys and values as given, for dense and paged attention alike."""

    def cached_query(self, q: torch.Tensor) -> torch.Tensor:
        return q

    def cached_output(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def new_kv(self, k: torch.Tensor, v: torch.Tensor | None,
               v_dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        return k, (v if v is not None else k[..., :v_dim])

    def output_dim(self, v_dim: int) -> int:
        return v_dim

    expand_prefix = False  # the prefix is read in the cache's form


SAME_FORMS = SameForms()


def absorb_query(q_nope: torch.Tensor, q_rope: torch.Tensor,
                 w_uk: torch.Tensor) -> torch.Tensor:
    """[q_nope_h W_UK_h, q_rope_h]: q_nope [T, H, nope], w_uk [H, nope, L] -> [T, H, L + R]."""
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)
    return torch.cat([q_latent, q_rope], -1)


def latent_to_values(out: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """out_h W_UV_h^T: out [T, H, L], w_uv [H, v, L] -> [T, H, v]."""
    return torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)


@dataclass(frozen=True)
class LatentForms:
    """MLA with the dense part expanded. `kv_b` is kv_b_proj's weight for this rank's heads,
    [H * (nope + v), L]: per head, the nope rows of W_UK then the rows of W_UV."""

    kv_b: torch.Tensor
    num_heads: int
    nope: int
    v_head_dim: int
    latent_dim: int
    expand_prefix: bool = True  # read the cached prefix expanded too (see above)

    def _up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b.view(self.num_heads, self.nope + self.v_head_dim, self.latent_dim)
        return w[:, : self.nope], w[:, self.nope:]

    def cached_query(self, q: torch.Tensor) -> torch.Tensor:
        """Expanded [n, H, nope + R] -> absorbed [n, H, L + R]."""
        return absorb_query(q[..., : self.nope], q[..., self.nope:], self._up_projections()[0])

    def cached_output(self, out: torch.Tensor) -> torch.Tensor:
        return latent_to_values(out, self._up_projections()[1])

    def new_kv(self, k: torch.Tensor, v: torch.Tensor | None,
               v_dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent keys [m, 1, L + R] -> per-head keys [m, H, nope + R] and values [m, H, v],
        one GEMM for both up-projections."""
        m, latent_dim = k.shape[0], self.latent_dim
        kv = F.linear(k[:, 0, :latent_dim], self.kv_b).view(m, self.num_heads, -1)
        k_nope, values = kv.split([self.nope, self.v_head_dim], -1)
        k_rope = k[:, :, latent_dim:].expand(m, self.num_heads, -1)
        return torch.cat([k_nope, k_rope], -1), values

    def output_dim(self, v_dim: int) -> int:
        return self.v_head_dim

    def expand_into(self, latent: torch.Tensor, scratch: torch.Tensor, keys: torch.Tensor,
                    values: torch.Tensor) -> None:
        """`new_kv` into preallocated buffers (the GPU backend's prefix workspace): latent
        [m, 1, L + R] -> keys [m, H, nope + R]; values [m, H, >= v], whose channels past v
        are left as they are (the backend keeps them 0: the library ops' padding). `scratch`
        [m, H * (nope + v)] takes the up-projection GEMM."""
        m, heads, latent_dim = latent.shape[0], self.num_heads, self.latent_dim
        torch.matmul(latent[:, 0, :latent_dim], self.kv_b.t(), out=scratch)
        kv = scratch.view(m, heads, self.nope + self.v_head_dim)
        keys[..., : self.nope].copy_(kv[..., : self.nope])
        keys[..., self.nope:].copy_(latent[:, :, latent_dim:].expand(m, heads, -1))
        values[..., : self.v_head_dim].copy_(kv[..., self.nope:])
