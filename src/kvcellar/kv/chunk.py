"""KVChunk: the attention keys/values of a run of tokens, in one tensor, with its token ids.

Layout ``[layers, 2, kv_heads, tokens, head_dim]`` (index 0 = keys, 1 = values) keeps a whole chunk
contiguous, so it is one memcpy to store and one to load, whatever the model's layer count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

TOKEN_DIM = 3


@dataclass(frozen=True)
class KVChunk:
    """KV of ``tokens`` (post-RoPE keys at their absolute positions, as the model cached them)."""

    kv: torch.Tensor
    tokens: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.kv.dim() != 5 or self.kv.shape[1] != 2:
            raise ValueError(
                f"KV tensor must be [layers, 2, kv_heads, tokens, head_dim], got {tuple(self.kv.shape)}"
            )
        if self.kv.shape[TOKEN_DIM] != len(self.tokens):
            raise ValueError(
                f"KV holds {self.kv.shape[TOKEN_DIM]} tokens but {len(self.tokens)} token ids were given"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def slice(self, start: int, end: int) -> KVChunk:
        """Tokens [start, end) as a view (no copy)."""
        return KVChunk(self.kv[:, :, :, start:end, :], self.tokens[start:end])

    @staticmethod
    def concat(chunks: Sequence[KVChunk]) -> KVChunk:
        """Join chunks along the token axis into one contiguous chunk."""
        if not chunks:
            raise ValueError("cannot concatenate zero chunks")
        if len(chunks) == 1:
            return chunks[0]
        kv = torch.cat([c.kv for c in chunks], dim=TOKEN_DIM)
        tokens: tuple[int, ...] = sum((c.tokens for c in chunks), ())
        return KVChunk(kv, tokens)


def bytes_per_token(layers: int, kv_heads: int, head_dim: int, element_size: int) -> int:
    """Bytes of KV one token occupies: layers * 2 * kv_heads * head_dim * bytes per element."""
    return layers * 2 * kv_heads * head_dim * element_size
