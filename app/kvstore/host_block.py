"""Encoded blocks read from disk, held in host memory and turned into MLX arrays only on demand.

A block file holds every layer stacked on axis 0. Restoring decodes straight
from those bytes (C kernels), so the per-layer MLX arrays a cache keeps for
each sealed block (`SealingKVCache.sealed`) are made lazily: most restored
caches never need them (their blocks are already on disk and are not saved
again), and making ~6 arrays per layer per block cost ~10 ms at 8K tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

import mlx.core as mx

from app.kvstore.blockfile import HostTensor


class LayerBlock(Mapping):
    """Layer `index` of a block file's stacked tensors: name -> MLX array, made (and kept) when first read."""

    __slots__ = ("host", "index", "_made")

    def __init__(self, host: dict[str, HostTensor], index: int):
        self.host = host
        self.index = index
        self._made: dict[str, mx.array] = {}

    def __getitem__(self, name: str) -> mx.array:
        made = self._made.get(name)
        if made is None:
            made = self._made[name] = self.host[name].to_mx(self.index)
        return made

    def __iter__(self):
        return iter(self.host)

    def __len__(self) -> int:
        return len(self.host)

    @property
    def nbytes(self) -> int:
        """This layer's share of the block's bytes (without making any array)."""
        return sum(t.nbytes // t.data.shape[0] for t in self.host.values())


def block_nbytes(block: Mapping) -> int:
    """Bytes of one layer's encoded block, whether a plain dict of MLX arrays or a `LayerBlock`."""
    if isinstance(block, LayerBlock):
        return block.nbytes
    return sum(a.nbytes for a in block.values())


def layer_blocks(host: dict[str, HostTensor], n_layers: int) -> list[LayerBlock]:
    return [LayerBlock(host, i) for i in range(n_layers)]


def stacked(per_layer: list[Mapping]) -> dict:
    """One block across all layers, as the decoder takes it: the file's stacked tensors when every
    layer is a `LayerBlock` of the same file (no copies), otherwise name -> list of per-layer arrays."""
    first = per_layer[0] if per_layer else None
    if isinstance(first, LayerBlock) and all(
            isinstance(b, LayerBlock) and b.host is first.host and b.index == i for i, b in enumerate(per_layer)) \
            and all(t.data.shape[0] == len(per_layer) for t in first.host.values()):
        return first.host
    return {name: [b[name] for b in per_layer] for name in (first or {})}
