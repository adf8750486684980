"""Context parallelism: tokenmix's operators with the token dimension sharded across the ranks
of a ``torch.distributed`` process group (gloo on CPUs, NCCL on GPUs), equal to the
single-process operators. See docs/distributed.md.

* :func:`neighborhood_attention` exchanges only the halo rows its windows reach;
* :func:`linear_attention` and :func:`delta_rule` pass states between ranks;
* :func:`block_sparse_attention` fetches only the key blocks its layout uses.

:func:`shard` and :func:`shard_sizes` cut tensors the way the operators expect;
:func:`count_bytes` measures the bytes a rank sends.
"""

from __future__ import annotations

from ._comm import ByteCount, count_bytes
from .block_sparse import block_sparse_attention, key_block_plan
from .linear_scan import delta_rule, linear_attention
from .modules import context_parallel
from .neighborhood import halo_plan, neighborhood_attention
from .sharding import shard, shard_bounds, shard_sizes

__all__ = [
    "ByteCount",
    "block_sparse_attention",
    "context_parallel",
    "count_bytes",
    "delta_rule",
    "halo_plan",
    "key_block_plan",
    "linear_attention",
    "neighborhood_attention",
    "shard",
    "shard_bounds",
    "shard_sizes",
]
