"""Switching tokenmix's ``nn`` layers to their sharded operators."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ..block_sparse.modules import BlockSparseAttention
from ..compat.natten import _NeighborhoodAttentionND as _NattenLayer
from ..linear_scan.modules import GatedDeltaNet, LinearAttention
from ..neighborhood.modules import _NeighborhoodAttentionND

__all__ = ["context_parallel"]

_LAYERS = (
    _NeighborhoodAttentionND,
    _NattenLayer,
    LinearAttention,
    GatedDeltaNet,
    BlockSparseAttention,
)


def context_parallel(
    module: nn.Module, group: dist.ProcessGroup | None = None, enable: bool = True
) -> nn.Module:
    """Makes every tokenmix attention layer inside ``module`` (neighborhood attention, linear
    attention, also ``tokenmix.compat.natten``'s layers, Gated DeltaNet, block-sparse and
    pattern layers) run with its input sharded
    along dimension 1 across ``group`` (``enable=False`` switches them back). In place;
    returns ``module``. Everything else in the model (projections, norms, MLPs) works per
    token and needs no change.

    Example (under ``torchrun --nproc-per-node 2``)::

        model = tokenmix.nn.NeighborhoodAttention2D(dim=128, num_heads=4, kernel_size=7)
        tokenmix.distributed.context_parallel(model)
        y = model(tokenmix.distributed.shard(x, dim=1))   # this rank's rows of the output
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    layers = [m for m in module.modules() if isinstance(m, _LAYERS)]
    if not layers:
        raise ValueError(
            f"{type(module).__name__} holds no tokenmix layer that runs sharded "
            f"({', '.join(t.__name__.lstrip('_') for t in _LAYERS)})"
        )
    unsupported = [
        f"{type(m).__name__} ({m.context_parallel_unsupported})"
        for m in layers
        if getattr(m, "context_parallel_unsupported", None)
    ]
    if enable and unsupported:
        raise NotImplementedError(
            f"{type(module).__name__} holds layers with no sharded form yet: "
            f"{'; '.join(unsupported)}"
        )
    for layer in layers:
        layer._tokenmix_context_parallel = (group,) if enable else None
    return module
