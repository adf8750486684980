"""Linear attention and the (gated) delta rule with the token dimension sharded across ranks.

The state passing (docs/distributed.md): every variant's state update is affine in the state,
``S_t = A_t S_{t-1} + B_t``, so a shard maps the state it starts from to the one it ends with
as ``S_out = A S_in + F``. The scan computes ``A`` itself: run over ``[v | 0]`` from
``[S_0 | I]`` (the value columns evolve independently), the final state is
``[F + A S_0 | A]``. So:

1. Each rank whose last sequence continues on the next rank scans that sequence's tokens from
   a zero state (its true initial state when the sequence starts here) with the identity
   appended, giving ``(F, A)``.
2. One all-gather of ``(F, A)``; each rank folds the earlier ranks' pairs into the state its
   first sequence starts from.
3. A second local pass, the ordinary operator with those initial states, gives the outputs and
   the final states.

The backward is autograd through the same steps: the second pass's state gradient flows back
through the fold and the all-gather to the ranks that produced ``(F, A)``. Bidirectional
linear attention (``causal=False``) sums the other ranks' state contributions instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .._utils import accumulation_dtype
from ..linear_scan import functional as _local
from ..linear_scan.args import (
    check_cu_seqlens,
    check_delta_rule,
    check_linear_attention,
    check_state,
)
from ._comm import (
    all_gather_sizes,
    gather_states,
    group_rank_size,
    operator_scope,
    reduce_replicated,
)
from .sharding import shard_bounds

__all__ = ["delta_rule", "linear_attention"]


@dataclass
class _Segment:
    seq: int  # global sequence index (the batch index without cu_seqlens)
    start: int  # local token range [start, end)
    end: int
    starts_here: bool
    ends_here: bool


class _Sequences:
    """Which sequences each rank's tokens belong to: the whole token range per batch element
    without ``cu_seqlens``, the packed ranges with them."""

    def __init__(self, bounds: list[tuple[int, int]], batch: int, offsets: list[int] | None):
        self.bounds, self.batch, self.offsets = bounds, batch, offsets
        self.total = bounds[-1][1]
        self._segments = [self._find_segments(rank) for rank in range(len(bounds))]

    def segments(self, rank: int) -> list[_Segment]:
        """This rank's pieces of sequences, in token order."""
        return self._segments[rank]

    def _find_segments(self, rank: int) -> list[_Segment]:
        a, b = self.bounds[rank]
        if self.offsets is None:
            return [_Segment(s, 0, b - a, a == 0, b == self.total) for s in range(self.batch)]
        out = []
        for s in range(len(self.offsets) - 1):
            lo, hi = self.offsets[s], self.offsets[s + 1]
            if lo < b and hi > a:
                out.append(_Segment(s, max(lo, a) - a, min(hi, b) - a, lo >= a, hi <= b))
        return out

    @property
    def count(self) -> int:
        """The number of sequences (of states)."""
        return self.batch if self.offsets is None else len(self.offsets) - 1

    def local_cu(self, rank: int, device: torch.device) -> Tensor | None:
        """This rank's ``cu_seqlens`` (None without packing)."""
        if self.offsets is None:
            return None
        ends = [seg.end for seg in self.segments(rank)]
        return torch.tensor([0, *ends], dtype=torch.int64, device=device)

    def carries_out(self, rank: int) -> bool:
        """Whether this rank's last sequence goes on past its last token."""
        return not self.segments(rank)[-1].ends_here

    def carries_in(self, rank: int) -> bool:
        """Whether this rank's first sequence started on an earlier rank."""
        return not self.segments(rank)[0].starts_here

    def passes_through(self, rank: int) -> bool:
        """Whether the state this rank hands on depends on the one it received: its last
        sequence started on an earlier rank (so it is also its first)."""
        return not self.segments(rank)[-1].starts_here


def _local_checks(check, q, cu_seqlens, initial_state, width):
    """Everything one rank can check alone (before any communication): the operator's own
    checks of its shard, and ``cu_seqlens`` and ``initial_state`` but for the whole length."""

    def run():
        check()
        n = q.shape[0]
        if cu_seqlens is not None:
            ok = isinstance(cu_seqlens, Tensor) and cu_seqlens.dim() == 1 and cu_seqlens.numel()
            end = int(cu_seqlens[-1]) if ok else 0  # the whole length is checked afterwards
            check_cu_seqlens(cu_seqlens, q.shape[0], end, q.device)
            n = cu_seqlens.shape[0] - 1
        if initial_state is not None:
            check_state(initial_state, "initial_state", q, n, q.shape[2], q.shape[3], width)

    return run


def _prepare(q, group, cu_seqlens, check):
    rank, _ = group_rank_size(group)
    sizes = all_gather_sizes(
        q.shape[1] if isinstance(q, Tensor) and q.dim() > 1 else 0, group, check
    )
    if min(sizes) < 1:
        raise ValueError(
            f"every rank must hold at least one token of q's dimension 1, got shard lengths {sizes}"
        )
    offsets = None
    if cu_seqlens is not None:
        offsets = check_cu_seqlens(cu_seqlens, q.shape[0], sum(sizes), q.device)
    return rank, _Sequences(shard_bounds(sizes), q.shape[0], offsets)


def _slice_tokens(t: Tensor | None, start: int, end: int) -> Tensor | None:
    """A per-token tensor's tokens ``[start, end)``; per-head ``g_gamma`` as it is."""
    return t if t is None or t.dim() < 2 else t[:, start:end]


def _fold(gathered: Tensor, seqs: _Sequences, rank: int, width: int) -> Tensor | None:
    """The state rank ``rank``'s first sequence starts from: the earlier ranks' ``(F, A)``
    pairs folded in rank order (None when that sequence starts on this rank)."""
    if not seqs.carries_in(rank):
        return None
    carry = None
    for p in range(rank):
        if not seqs.carries_out(p):
            carry = None
            continue
        f, a = gathered[p][..., :width], gathered[p][..., width:]
        carry = f + a @ carry if seqs.passes_through(p) and carry is not None else f
    return carry


def _scan_sharded(run, inputs, width, init, output_final_state, seqs, rank, group):
    """Steps 1-3 of the module docstring for a causal scan. ``run(inputs, v, state0, cu,
    final, normalized)`` calls the local operator; ``inputs`` holds the per-rank tensors (``q``,
    ``k``, ``v``, gates; ``v_state`` is ``v`` with the normalizer's column of ones when there is
    one) and ``g_gamma``; ``init`` is the replicated initial state in the accumulation dtype."""
    v = inputs["v"]
    acc = init.dtype if init is not None else accumulation_dtype(v.dtype)
    heads, dim_k = v.shape[2], inputs["k"].shape[-1]
    segments = seqs.segments(rank)
    batch_mode = seqs.offsets is None
    n_states = seqs.count
    lead = seqs.batch if batch_mode else 1

    def true_init(seg: _Segment) -> Tensor:
        if init is not None:
            return init if batch_mode else init[seg.seq]
        shape = (seqs.batch, heads, dim_k, width) if batch_mode else (heads, dim_k, width)
        return v.new_zeros(shape, dtype=acc)

    # 1. (F, A) of the sequence that continues on the next rank.
    pair = v.new_zeros(lead, heads, dim_k, width + dim_k, dtype=acc)
    if seqs.carries_out(rank):
        last = segments[-1]
        part = {n: _slice_tokens(t, last.start, last.end) for n, t in inputs.items()}
        if last.starts_here:  # F from the true initial state; A is not needed
            start0 = true_init(last) if batch_mode else true_init(last).unsqueeze(0)
            _, final = run(part, part["v_state"], start0, None, True, False)
            pair = torch.cat([final, pair[..., width:]], dim=-1)
        else:
            eye = torch.eye(dim_k, dtype=acc, device=v.device).expand(lead, heads, dim_k, dim_k)
            v_last = part["v_state"]
            v_aug = torch.cat([v_last, v_last.new_zeros(*v_last.shape[:-1], dim_k)], dim=-1)
            start0 = torch.cat([pair[..., :width], eye], dim=-1)
            _, pair = run(part, v_aug, start0, None, True, False)

    # 2. One all-gather, then the fold. Everything the second pass reads goes through the
    # gather, so its backward is on every rank's path (see _comm).
    names = sorted(n for n, t in inputs.items() if t is not None)
    gathered, passed = gather_states(group, pair, [inputs[n] for n in names] + [init])
    inputs = dict(zip(names, passed[:-1], strict=True))
    init = passed[-1]
    carry = _fold(gathered, seqs, rank, width)

    # 3. The ordinary operator from the true initial states.
    if batch_mode:
        state0 = carry if carry is not None else init
        cu = None
    else:
        state0 = None
        if init is not None or carry is not None:
            state0 = torch.stack(
                [
                    carry[0] if j == 0 and carry is not None else true_init(seg)
                    for j, seg in enumerate(segments)
                ]
            )
        cu = seqs.local_cu(rank, v.device)
    o, final = run(inputs, inputs["v"], state0, cu, output_final_state, True)
    if not output_final_state:
        return o, None
    # Each sequence's final state comes from the rank holding its last token; one all-reduce
    # puts them all on every rank.
    # Every rank's copy stays on the graph (an empty index where no sequence ends here), so a
    # loss of the final states alone runs the backward, and its collective, on every rank.
    ended = [j for j, seg in enumerate(segments) if seg.ends_here]
    idx = torch.tensor([segments[j].seq for j in ended], dtype=torch.int64, device=v.device)
    mine = final.index_select(0, torch.tensor(ended, dtype=torch.int64, device=v.device))
    full = final.new_zeros(n_states, heads, dim_k, width).index_copy(0, idx, mine)
    return o, reduce_replicated(full, group)


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    g: Tensor | None = None,
    g_gamma: Tensor | None = None,
    gk: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    normalize: bool = False,
    causal: bool = True,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`tokenmix.linear_attention` with the token dimension sharded across ranks.

    Each rank passes its contiguous piece (dimension 1, ranks in order, at least one token
    each) of ``q``, ``k``, ``v``, ``g`` and ``gk``; ``g_gamma``, ``initial_state`` and the
    global ``cu_seqlens`` (offsets into the whole token dimension; sequences may cross shard
    boundaries) are the same on every rank. Returns this rank's piece of the output and, with
    ``output_final_state``, every sequence's final state on every rank.

    Gradients: ``g_gamma`` and ``initial_state`` are used like parameters (each rank's gradient
    is its share; the sum over the ranks is the single-process gradient). The final states are
    replicated: their gradient must be the same on every rank (each rank computing the same
    loss from them), and it counts once.

    Example (under ``torchrun --nproc-per-node 2``)::

        import torch, torch.distributed as dist, tokenmix.distributed as tmd
        dist.init_process_group("gloo")
        torch.manual_seed(0)  # the same whole tensors on every rank, for the example
        q, k, v = (tmd.shard(torch.randn(1, 4096, 4, 64)) for _ in range(3))
        o, state = tmd.linear_attention(q, k, v, output_final_state=True)
    """

    def check():
        check_linear_attention(
            q, k, v, g=g, g_gamma=g_gamma, gk=gk, scale=scale, normalize=normalize, causal=causal
        )

    with operator_scope("linear_attention"):
        width = v.shape[-1] + int(normalize) if isinstance(v, Tensor) and v.dim() else 0
        rank, seqs = _prepare(
            q, group, cu_seqlens, _local_checks(check, q, cu_seqlens, initial_state, width)
        )
        if q.shape[0] == 0:  # an empty batch: nothing to pass on
            return _local.linear_attention(
                q,
                k,
                v,
                g=g,
                g_gamma=g_gamma,
                gk=gk,
                scale=scale,
                initial_state=initial_state,
                output_final_state=output_final_state,
                normalize=normalize,
                causal=causal,
            )
        acc = accumulation_dtype(q.dtype)
        init = None if initial_state is None else initial_state.to(acc)
        if not causal:
            return _bidirectional(
                q, k, v, scale, init, output_final_state, normalize, seqs, rank, group
            )

        def run(inputs, v_in, state0, cu, final, normalized):
            return _local.linear_attention(
                inputs["q"],
                inputs["k"],
                v_in,
                g=inputs.get("g"),
                g_gamma=inputs.get("g_gamma"),
                gk=inputs.get("gk"),
                scale=scale,
                initial_state=state0,
                output_final_state=final,
                cu_seqlens=cu,
                normalize=normalize and normalized,
            )

        v_state = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1) if normalize else v
        inputs = {"q": q, "k": k, "v": v, "g": g, "gk": gk, "g_gamma": g_gamma, "v_state": v_state}
        return _scan_sharded(run, inputs, width, init, output_final_state, seqs, rank, group)


def _bidirectional(q, k, v, scale, init, output_final_state, normalize, seqs, rank, group):
    """``causal=False``: every token reads its sequence's total state, the sum over all ranks."""
    segments = seqs.segments(rank)
    cu = seqs.local_cu(rank, q.device)
    _, local_sum = _local.linear_attention(
        q,
        k,
        v,
        scale=scale,
        output_final_state=True,
        cu_seqlens=cu,
        normalize=normalize,
        causal=False,
    )
    seq_idx = torch.tensor([s.seq for s in segments], device=q.device)
    mine = local_sum.new_zeros(seqs.count, *local_sum.shape[1:]).index_copy(0, seq_idx, local_sum)
    gathered, (q, k, v, init) = gather_states(group, mine, [q, k, v, init])
    others = init
    for p in range(gathered.shape[0]):
        if p != rank:
            others = gathered[p] if others is None else others + gathered[p]
    o, _ = _local.linear_attention(
        q,
        k,
        v,
        scale=scale,
        initial_state=None if others is None else others.index_select(0, seq_idx),
        cu_seqlens=cu,
        normalize=normalize,
        causal=False,
    )
    if not output_final_state:
        return o, None
    # The total, computed on rank 0 only so that its (replicated) gradient counts once.
    total = init
    for p in range(gathered.shape[0]):
        total = gathered[p] if total is None else total + gathered[p]
    # Elsewhere zeros that stay on the graph (where, not a product: a NaN must not leak).
    if rank != 0:
        total = torch.where(torch.zeros((), dtype=torch.bool, device=total.device), total, 0.0)
    return o, reduce_replicated(total, group)


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    g: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`tokenmix.delta_rule` (gated with ``g``) with the token dimension sharded across
    ranks; the conventions of :func:`linear_attention`. The delta rule's transition
    ``exp(g)(I - beta k k^T)`` is a full ``K x K`` matrix, so each rank's pair ``(F, A)`` is
    ``K x (V + K)`` per head."""
    with operator_scope("delta_rule"):
        width = v.shape[-1] if isinstance(v, Tensor) and v.dim() else 0
        check = _local_checks(
            lambda: check_delta_rule(q, k, v, beta, g=g, scale=scale),
            q,
            cu_seqlens,
            initial_state,
            width,
        )
        rank, seqs = _prepare(q, group, cu_seqlens, check)
        if q.shape[0] == 0:  # an empty batch: nothing to pass on
            return _local.delta_rule(
                q,
                k,
                v,
                beta,
                g=g,
                scale=scale,
                initial_state=initial_state,
                output_final_state=output_final_state,
            )
        acc = accumulation_dtype(q.dtype)
        init = None if initial_state is None else initial_state.to(acc)

        def run(inputs, v_in, state0, cu, final, normalized):
            return _local.delta_rule(
                inputs["q"],
                inputs["k"],
                v_in,
                inputs["beta"],
                g=inputs.get("g"),
                scale=scale,
                initial_state=state0,
                output_final_state=final,
                cu_seqlens=cu,
            )

        inputs = {"q": q, "k": k, "v": v, "beta": beta, "g": g, "v_state": v}
        return _scan_sharded(run, inputs, width, init, output_final_state, seqs, rank, group)
