"""The communication the context-parallel operators use, with autograd and byte counting.

Everything goes through ``torch.distributed`` (gloo on CPUs, NCCL on GPUs): point-to-point
row exchanges for halos and key blocks, one all-gather of small per-rank states, and the
all-reduces of replicated tensors. Each function records the bytes this rank sends in
:data:`_COUNTERS` so :func:`tokenmix.distributed.count_bytes` can report them: point-to-point
sends exactly, collectives by the ring algorithm's volume per rank (all-gather ``(R-1) x`` the
local tensor, all-reduce ``2 (R-1)/R x`` the tensor).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "ByteCount",
    "RowExchange",
    "all_gather_sizes",
    "count_bytes",
    "exchange_rows",
    "gather_states",
    "group_rank_size",
    "reduce_replicated",
]


@dataclass
class ByteCount:
    """Bytes this rank sent, by kind, while :func:`count_bytes` was active."""

    point_to_point: int = 0
    collective: int = 0
    by_operator: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.point_to_point + self.collective


_COUNTERS: list[ByteCount] = []
_OPERATOR: list[str] = []


@contextlib.contextmanager
def count_bytes() -> Iterator[ByteCount]:
    """Count the bytes this rank sends inside the block (forward and backward)::

    with tokenmix.distributed.count_bytes() as sent:
        out = dist_neighborhood_attention(q, k, v, kernel_size=7)
        out.sum().backward()
    print(sent.total, sent.by_operator)
    """
    counter = ByteCount()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


@contextlib.contextmanager
def operator_scope(name: str) -> Iterator[None]:
    _OPERATOR.append(name)
    try:
        yield
    finally:
        _OPERATOR.pop()


def current_operator() -> str:
    return _OPERATOR[-1] if _OPERATOR else "other"


def _record(nbytes: int, kind: str) -> None:
    for counter in _COUNTERS:
        if kind == "p2p":
            counter.point_to_point += nbytes
        else:
            counter.collective += nbytes
        key = current_operator()
        counter.by_operator[key] = counter.by_operator.get(key, 0) + nbytes


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; a clear error without
    ``torch.distributed`` initialized."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "tokenmix.distributed needs torch.distributed initialized: call "
            "torch.distributed.init_process_group('gloo' or 'nccl', ...) first"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _global_rank(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _comm_device(group) -> torch.device:
    """Where this group's small bookkeeping tensors live (NCCL needs them on the GPU)."""
    if str(dist.get_backend(group)) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_sizes(n: int, group: dist.ProcessGroup | None, check=None) -> list[int]:
    """Every rank's ``n`` (the local shard lengths), in rank order.

    ``check`` (optional) validates this rank's arguments first. Its error is raised on this
    rank, and every other rank raises too (naming this one) instead of waiting forever in
    the call's next collective."""
    _, world = group_rank_size(group)
    error = None
    if check is not None:
        try:
            check()
        except Exception as exc:  # re-raised below, once every rank knows
            error = exc
    mine = torch.tensor([n, error is not None], dtype=torch.int64, device=_comm_device(group))
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    _record(_nbytes(mine) * (world - 1), "collective")
    if error is not None:
        raise error
    failed = [p for p, part in enumerate(parts) if int(part[1])]
    if failed:
        raise RuntimeError(
            f"rank(s) {failed} of the process group rejected their arguments (see their "
            "errors); this rank stops too"
        )
    return [int(part[0]) for part in parts]


# ---- row exchange (halos, key blocks) ---------------------------------------------------------


@dataclass(frozen=True)
class RowExchange:
    """Which rows of dimension 1 move between ranks, from this rank's point of view.

    The output is a ``[B, out_len, ...]`` buffer: this rank's own rows ``own_src`` (indices
    into its shard) land at ``own_dst``; the rows received from peer ``p`` land at
    ``recv[p]``; every other row is zero. ``send[p]`` are the rows of this shard that peer
    ``p`` receives, in the order it places them.
    """

    out_len: int
    own_src: Tensor
    own_dst: Tensor
    send: dict[int, Tensor]
    recv: dict[int, Tensor]

    def to(self, device: torch.device) -> RowExchange:
        """The same plan with its index tensors on ``device``."""

        def move(t: Tensor) -> Tensor:
            return t.to(device)

        return RowExchange(
            self.out_len,
            move(self.own_src),
            move(self.own_dst),
            {p: move(t) for p, t in self.send.items()},
            {p: move(t) for p, t in self.recv.items()},
        )


def _post(ops: Sequence[tuple[str, Tensor, int]], group) -> None:
    """Runs the sends and receives as one batch, so no pair of ranks waits on the other
    (with NCCL, one group call)."""
    p2p = []
    for kind, tensor, peer in ops:
        target = _global_rank(group, peer)
        if kind == "send":
            p2p.append(dist.P2POp(dist.isend, tensor, target, group=group))
            _record(_nbytes(tensor), "p2p")
        else:
            p2p.append(dist.P2POp(dist.irecv, tensor, target, group=group))
    if p2p:
        for request in dist.batch_isend_irecv(p2p):
            request.wait()


class _ExchangeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, plan: RowExchange, group) -> Tensor:
        out = x.new_zeros(x.shape[0], plan.out_len, *x.shape[2:])
        out.index_copy_(1, plan.own_dst, x.index_select(1, plan.own_src))
        ops, inbox = [], {}
        for peer, rows in sorted(plan.send.items()):
            ops.append(("send", x.index_select(1, rows).contiguous(), peer))
        for peer, rows in sorted(plan.recv.items()):
            inbox[peer] = x.new_empty(x.shape[0], rows.numel(), *x.shape[2:])
            ops.append(("recv", inbox[peer], peer))
        _post(ops, group)
        for peer, rows in plan.recv.items():
            out.index_copy_(1, rows, inbox[peer])
        ctx.plan, ctx.group, ctx.shape = plan, group, x.shape
        ctx.operator = current_operator()
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        plan, group = ctx.plan, ctx.group
        grad_out = grad_out.contiguous()
        grad = grad_out.new_zeros(ctx.shape)
        grad.index_add_(1, plan.own_src, grad_out.index_select(1, plan.own_dst))
        # The reverse of the forward: the receivers return the gradient of the rows they got,
        # and the owners add it to theirs, peers in rank order (deterministic).
        ops, inbox = [], {}
        for peer, rows in sorted(plan.recv.items()):
            ops.append(("send", grad_out.index_select(1, rows).contiguous(), peer))
        for peer, rows in sorted(plan.send.items()):
            inbox[peer] = grad_out.new_empty(grad_out.shape[0], rows.numel(), *grad_out.shape[2:])
            ops.append(("recv", inbox[peer], peer))
        with operator_scope(ctx.operator):  # the bytes count for the call's operator
            _post(ops, group)
        for peer in sorted(plan.send):
            grad.index_add_(1, plan.send[peer], inbox[peer])
        return grad, None, None


def exchange_rows(x: Tensor, plan: RowExchange, group: dist.ProcessGroup | None) -> Tensor:
    """The ``[B, plan.out_len, ...]`` buffer of :class:`RowExchange`; differentiable (the
    backward sends the received rows' gradients back to their owners, who add them up)."""
    return _ExchangeRows.apply(x, plan, group)


# ---- replicated results and gathered states ---------------------------------------------------
#
# A tensor every rank passes whole (``rpb``, extra tokens, ``initial_state``, ``g_gamma``) is
# treated like a model parameter: its gradient on each rank is that rank's share, and the sum
# over the ranks (what DDP or an all-reduce computes) is the single-process gradient.
#
# Every collective of a backward must run on every rank, in the same order. Autograd runs a
# node only when something below it needs a gradient, and the graphs of one call differ between
# ranks (rank 0 of a scan never reads the gathered states). So :func:`gather_states`, the one
# backward collective, also passes through every per-rank tensor the rest of the call reads:
# every rank's backward then runs it, after the call's later steps and before its earlier ones.


def _all_reduce_sum(t: Tensor, group) -> Tensor:
    t = t.contiguous().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    _, world = group_rank_size(group)
    _record(2 * (world - 1) * _nbytes(t) // max(world, 1), "collective")
    return t


def _device(grads) -> torch.device:
    for g in grads:
        if g is not None:
            return g.device
    return torch.device("cpu")


class _ReduceReplicated(torch.autograd.Function):
    """All-reduce (sum) forward; the backward passes the (replicated) gradient through."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        return _all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def reduce_replicated(x: Tensor, group) -> Tensor:
    """Sum of every rank's ``x``, returned on every rank (each rank fills its own entries and
    leaves zeros elsewhere). The result is replicated, so its gradient is taken to be the
    same on every rank and passes straight back."""
    return _ReduceReplicated.apply(x, group)


class _GatherStates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, x: Tensor, *passthrough: Tensor):
        _, world = group_rank_size(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        _record(_nbytes(x) * (world - 1), "collective")
        ctx.group, ctx.shape, ctx.dtype = group, x.shape, x.dtype
        ctx.operator = current_operator()
        return (torch.stack(parts), *(t.view_as(t) for t in passthrough))

    @staticmethod
    def backward(ctx, grad: Tensor | None, *passthrough):
        # Each rank's piece was used by every rank: its gradient is the sum of theirs.
        _, world = group_rank_size(ctx.group)
        if grad is None:
            grad = torch.zeros(world, *ctx.shape, dtype=ctx.dtype, device=_device(passthrough))
        with operator_scope(ctx.operator):
            summed = _reduce_scatter_sum(grad, ctx.group)
        return (None, summed, *passthrough)


_NO_REDUCE_SCATTER: set[str] = set()


def _reduce_scatter_sum(stacked: Tensor, group) -> Tensor:
    """``stacked[rank]`` summed over the ranks: a reduce-scatter, or an all-reduce where the
    backend has none (gloo before torch 2.x's reduce_scatter support)."""
    rank, world = group_rank_size(group)
    backend = str(dist.get_backend(group))
    stacked = stacked.contiguous()
    if backend not in _NO_REDUCE_SCATTER and stacked.dim() > 1:
        out = torch.empty_like(stacked[0])
        try:  # the input is the pieces concatenated along dimension 0
            # torch 2.13 renamed reduce_scatter_tensor (the old name warns).
            scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            scatter(out, stacked.flatten(0, 1), op=dist.ReduceOp.SUM, group=group)
        except (RuntimeError, NotImplementedError) as exc:
            # Only a backend without the collective falls back; a failure is a failure.
            text = str(exc).lower()
            if not any(w in text for w in ("support", "not implemented")):
                raise
            _NO_REDUCE_SCATTER.add(backend)
        else:
            _record((world - 1) * _nbytes(out), "collective")
            return out
    return _all_reduce_sum(stacked, group)[rank]


def gather_states(group, x: Tensor, passthrough: Sequence[Tensor | None]):
    """``([world, *x.shape], passthrough)``: every rank's ``x`` in rank order, differentiable.
    ``passthrough`` (the per-rank tensors the rest of the call reads) come back as they are:
    routing them through here puts the backward's all-reduce on every rank's path."""
    items = [t for t in passthrough if t is not None]
    gathered, *rest = _GatherStates.apply(group, x, *items)
    out = iter(rest)
    return gathered, [None if t is None else next(out) for t in passthrough]
