"""How the ``nn`` layers pick their operator under :func:`tokenmix.distributed.context_parallel`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def is_sharded(module: Any) -> bool:
    """Whether :func:`tokenmix.distributed.context_parallel` switched this layer on."""
    return getattr(module, "_tokenmix_context_parallel", None) is not None


def pick_operator(module: Any, local: Callable, name: str) -> Callable:
    """``local``, or the ``tokenmix.distributed`` operator ``name`` bound to the layer's process
    group when the layer runs sharded."""
    switch = getattr(module, "_tokenmix_context_parallel", None)
    if switch is None:
        return local
    from . import distributed

    return functools.partial(getattr(distributed, name), group=switch[0])


def global_length(module: Any, length: int) -> int:
    """The whole sequence's length: ``length`` itself, or the sum of every rank's shard
    lengths when the layer runs sharded (one small all-gather)."""
    switch = getattr(module, "_tokenmix_context_parallel", None)
    if switch is None:
        return length
    from .distributed._comm import all_gather_sizes

    return sum(all_gather_sizes(length, switch[0]))
