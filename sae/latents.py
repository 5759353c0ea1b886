"""``Latents``: the sparse code of a batch of tokens, dense or as flat entries grouped by token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Latents:
    """Codes of n tokens over ``num_latents`` latents.

    Either ``dense`` [n, m] is set, or the flat form: ``values`` and ``indices`` [nnz] grouped by
    token, with ``offsets`` [n] giving where each token's entries start (the ``embedding_bag``
    layout). TopK-style architectures use the flat form so that nothing of size [n, m] is built
    after the encoder; entries may hold zeros (a TopK slot whose pre-activation was not positive).
    """

    num_latents: int
    dense: Tensor | None = None
    values: Tensor | None = None
    indices: Tensor | None = None
    offsets: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.dense.shape[0] if self.dense is not None else self.offsets.shape[0]

    @property
    def is_sparse(self) -> bool:
        return self.dense is None

    def rows(self) -> Tensor:
        """Token index of each flat entry, [nnz]."""
        n, nnz = self.offsets.shape[0], self.values.shape[0]
        counts = torch.diff(self.offsets, append=self.offsets.new_tensor([nnz]))
        return torch.repeat_interleave(torch.arange(n, device=self.offsets.device), counts)

    def to_dense(self) -> Tensor:
        """[n, m] activations."""
        if self.dense is not None:
            return self.dense
        out = self.values.new_zeros(self.num_tokens, self.num_latents)
        out[self.rows(), self.indices] = self.values
        return out

    def l0(self) -> Tensor:
        """Number of strictly positive latents per token, [n] (float)."""
        if self.dense is not None:
            return (self.dense > 0).sum(-1).float()
        active = (self.values > 0).float()
        return torch.zeros(self.num_tokens, device=active.device).index_add_(0, self.rows(), active)

    def fire_counts(self) -> Tensor:
        """How many tokens each latent fired on, [m] (float)."""
        if self.dense is not None:
            return (self.dense > 0).sum(0).float()
        active = (self.values > 0).float()
        return torch.zeros(self.num_latents, device=active.device).index_add_(0, self.indices, active)

    def detach(self) -> "Latents":
        def d(t):
            return None if t is None else t.detach()

        return Latents(self.num_latents, d(self.dense), d(self.values), d(self.indices), d(self.offsets))
