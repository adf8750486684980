"""Multi-axis attention (MaxViT): block attention and grid attention on a 2-D token grid.

Tokens are the ``height x width`` positions of an image, numbered in raster order
``t = y * width + x``. With window ``(Ph, Pw) = block`` and grid ``(Gh, Gw) = grid``
(MaxViT's ``window_partition`` / ``grid_partition``, arXiv 2204.01697):

* **block attention** keeps ``(q, k)`` when both lie in the same non-overlapping
  ``Ph x Pw`` window: ``y_q // Ph == y_k // Ph and x_q // Pw == x_k // Pw``;
* **grid attention** keeps ``(q, k)`` when both lie in the same ``Gh x Gw`` grid, the tokens
  strided by ``(Sh, Sw) = (height / Gh, width / Gw)`` across the whole image:
  ``y_q mod Sh == y_k mod Sh and x_q mod Sw == x_k mod Sw``.

Neither is block-sparse in raster order (a window spans ``Ph`` rows; a grid group is strided
over the whole image), and in general no single token order makes every window and every grid
group contiguous: if two windows ``W1 < W2`` both meet two grid groups ``X1``, ``X2`` (true in
MaxViT's configurations), an interval meeting both windows contains the last token of ``W1``,
and the disjoint ``X1`` and ``X2`` cannot both contain it. :func:`multi_axis` therefore
gives one token order per axis, each a reshape of the raster grid (MaxViT's partition order),
under which that axis is exactly block-diagonal with dense (full) blocks: the *window order*
for block attention and the *grid order* for grid attention. Heads can use different axes in
one attention call: :meth:`MultiAxisPattern.permute`
takes a per-head list of axes and moves each head's tokens into its own order with one gather.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._checks import as_int, int_tuple, require_tensor
from ..block_sparse.layout import BlockLayout, MaskMod

__all__ = ["AXES", "MultiAxisPattern", "multi_axis", "multi_axis_mask_mod"]

AXES = ("block", "grid")


def _check_axis(axis: object, name: str = "axis") -> str:
    if axis not in AXES:
        raise ValueError(f"{name} must be 'block' or 'grid', got {axis!r}")
    return axis  # type: ignore[return-value]


def _geometry(
    height: int, width: int, block: int | Sequence[int], grid: int | Sequence[int]
) -> tuple[int, int, tuple[int, int], tuple[int, int]]:
    height, width = as_int(height, "height"), as_int(width, "width")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got ({height}, {width})")
    block_hw = int_tuple(block, "block", 2)
    grid_hw = int_tuple(grid, "grid", 2)
    for name, (a, b) in (("block", block_hw), ("grid", grid_hw)):
        if a < 1 or b < 1:
            raise ValueError(f"{name} must be >= 1 in both dimensions, got {(a, b)}")
    for name, sizes in (("block", block_hw), ("grid", grid_hw)):
        for dim, extent, s in (("height", height, sizes[0]), ("width", width, sizes[1])):
            if extent % s != 0:
                raise ValueError(
                    f"{dim} ({extent}) must be a multiple of {name} ({s}) "
                    f"(MaxViT partitions the grid exactly; pad the image first)"
                )
    return height, width, block_hw, grid_hw


def multi_axis_mask_mod(
    height: int,
    width: int,
    block: int | Sequence[int],
    grid: int | Sequence[int],
    axis: str = "block",
) -> MaskMod:
    """The Flex ``mask_mod`` of one axis on raster-order token indices ``t = y * width + x``
    (see the module docstring): ``axis='block'`` keeps the same ``block`` window,
    ``axis='grid'`` keeps the same grid group (same ``y mod height/grid[0]`` and
    ``x mod width/grid[1]``). Use it with ``create_block_mask`` on unpermuted tokens; the
    layouts of :func:`multi_axis` are the same rule on permuted tokens."""
    height, width, (ph, pw), (gh, gw) = _geometry(height, width, block, grid)
    _check_axis(axis)
    sh, sw = height // gh, width // gw

    if axis == "block":

        def multi_axis_block(b, h, q_idx, kv_idx):
            yq, xq = q_idx // width, q_idx % width
            yk, xk = kv_idx // width, kv_idx % width
            return (yq // ph == yk // ph) & (xq // pw == xk // pw)

        return multi_axis_block

    def multi_axis_grid(b, h, q_idx, kv_idx):
        yq, xq = q_idx // width, q_idx % width
        yk, xk = kv_idx // width, kv_idx % width
        return (yq % sh == yk % sh) & (xq % sw == xk % sw)

    return multi_axis_grid


def _diagonal_layout(
    group_sizes: Sequence[int], block_size: int, length: int, device: torch.device
) -> BlockLayout:
    """A layout whose head ``j`` attends dense diagonal groups of ``group_sizes[j]`` tokens
    (each a multiple of ``block_size``): query block ``i`` lists the full kv blocks of its group."""
    nq = length // block_size
    per = [g // block_size for g in group_sizes]
    width = max(per)
    qb = torch.arange(nq, device=device)
    rows = []
    for n in per:
        first = (qb // n) * n
        idx = first.view(-1, 1) + torch.arange(width, device=device).view(1, -1)
        rows.append(torch.where(torch.arange(width, device=device) < n, idx, 0))
    full_index = torch.stack(rows).unsqueeze(0).to(torch.int32)  # [1, heads, nq, width]
    full_count = (
        torch.tensor(per, dtype=torch.int32, device=device).view(1, -1, 1).expand(1, len(per), nq)
    )
    empty = torch.zeros(1, len(per), nq, dtype=torch.int32, device=device)
    return BlockLayout(
        empty,
        torch.zeros(1, len(per), nq, 0, dtype=torch.int32, device=device),
        full_count.contiguous(),
        full_index.contiguous(),
        block_size=block_size,
        seq_lengths=(length, length),
    )


@dataclass(frozen=True, eq=False)
class MultiAxisPattern:
    """Block and grid attention on a ``height x width`` token grid (see the module docstring).

    Attributes:
        height, width: the token grid (``T = height * width`` tokens, raster order).
        block: ``(Ph, Pw)``, the window of block attention.
        grid: ``(Gh, Gw)``, the grid of grid attention.
        order: ``{'block': [T], 'grid': [T]}`` int64: position ``p`` of an axis' order holds
            raster token ``order[axis][p]``.
        block_layout: full diagonal ``Ph*Pw``-token blocks, for tokens in window order.
        grid_layout: full diagonal ``Gh*Gw``-token blocks, for tokens in grid order.
    """

    height: int
    width: int
    block: tuple[int, int]
    grid: tuple[int, int]
    order: dict[str, Tensor] = field(repr=False)
    inverse: dict[str, Tensor] = field(repr=False)
    block_layout: BlockLayout = field(repr=False)
    grid_layout: BlockLayout = field(repr=False)

    @property
    def num_tokens(self) -> int:
        return self.height * self.width

    @property
    def group_size(self) -> dict[str, int]:
        """Tokens per attention group: ``Ph*Pw`` (block) and ``Gh*Gw`` (grid)."""
        return {"block": self.block[0] * self.block[1], "grid": self.grid[0] * self.grid[1]}

    def layout(self, axes: str | Sequence[str], block_size: int | None = None) -> BlockLayout:
        """The layout of one axis (``axes`` a string) or a per-head layout (``axes`` a list,
        one axis per layout head; use one entry per K/V head so that the layout serves each
        head's GQA group). ``block_size`` (the kernels' block) must divide the group size of
        every axis used; it defaults to their gcd (the group size for one axis)."""
        names = [_check_axis(axes)] if isinstance(axes, str) else [_check_axis(a) for a in axes]
        if not names:
            raise ValueError("axes must name at least one axis")
        sizes = [self.group_size[a] for a in names]
        if block_size is None:
            block_size = math.gcd(*sizes)
        block_size = as_int(block_size, "block_size")
        for a, s in zip(names, sizes, strict=True):
            if block_size < 1 or s % block_size != 0:
                raise ValueError(
                    f"block_size ({block_size}) must divide the {a} group size ({s} tokens)"
                )
        device = self.order["block"].device
        if isinstance(axes, str) and block_size == sizes[0]:
            return self.block_layout if axes == "block" else self.grid_layout
        return _diagonal_layout(sizes, block_size, self.num_tokens, device)

    def head_order(self, axes: Sequence[str], heads: int) -> Tensor:
        """int64 ``[T, heads]``: for each of ``heads`` heads (grouped evenly over ``axes``, head
        ``h`` uses ``axes[h // (heads // len(axes))]``), the raster token at each position."""
        names = [_check_axis(a) for a in axes]
        heads = as_int(heads, "heads")
        if not names or heads % len(names) != 0:
            raise ValueError(f"heads ({heads}) must be a multiple of len(axes) ({len(names)})")
        per = heads // len(names)
        cols = [self.order[a] for a in names for _ in range(per)]
        return torch.stack(cols, dim=1)

    def head_inverse(self, axes: Sequence[str], heads: int) -> Tensor:
        """int64 ``[T, heads]``: the inverse of :meth:`head_order` (the position of each raster
        token in its head's order)."""
        names = [_check_axis(a) for a in axes]
        if not names or heads % len(names) != 0:
            raise ValueError(f"heads ({heads}) must be a multiple of len(axes) ({len(names)})")
        per = heads // len(names)
        return torch.stack([self.inverse[a] for a in names for _ in range(per)], dim=1)

    def _move(self, x: Tensor, axes: str | Sequence[str], dim: int, inverse: bool) -> Tensor:
        require_tensor(x, "x")
        dim = as_int(dim, "dim")
        if x.dim() < 2:
            raise ValueError(f"x must be [B, T, ...], got shape {tuple(x.shape)}")
        dim = dim % x.dim()
        if x.shape[dim] != self.num_tokens:
            raise ValueError(
                f"x has {x.shape[dim]} tokens in dimension {dim}, expected height * width = "
                f"{self.num_tokens}"
            )
        table = self.inverse if inverse else self.order
        if isinstance(axes, str):
            return x.index_select(dim, table[_check_axis(axes)].to(x.device))
        if dim + 1 >= x.dim():
            raise ValueError("per-head axes need a heads dimension after the token dimension")
        heads = x.shape[dim + 1]
        index = (self.head_inverse if inverse else self.head_order)(axes, heads).to(x.device)
        shape = [1] * x.dim()
        shape[dim], shape[dim + 1] = index.shape
        return torch.gather(x, dim, index.view(shape).expand(x.shape))

    def permute(self, x: Tensor, axes: str | Sequence[str] = "block", dim: int = 1) -> Tensor:
        """Raster order -> the order of ``axes`` along ``dim`` (``[B, T, ...]`` tensors).

        ``axes`` is ``'block'`` or ``'grid'``, or a per-head list (the dimension after ``dim``
        holds the heads, grouped evenly over the list: pass one entry per K/V head and the
        same list permutes q, k and v). Differentiable; :meth:`unpermute` is its exact inverse.
        """
        return self._move(x, axes, dim, inverse=False)

    def unpermute(self, x: Tensor, axes: str | Sequence[str] = "block", dim: int = 1) -> Tensor:
        """The inverse of :meth:`permute`: back to raster order."""
        return self._move(x, axes, dim, inverse=True)

    def mask_mod(self, axis: str) -> MaskMod:
        """:func:`multi_axis_mask_mod` of this pattern (raster-order indices)."""
        return multi_axis_mask_mod(self.height, self.width, self.block, self.grid, axis)


def multi_axis(
    height: int,
    width: int,
    block: int | Sequence[int],
    grid: int | Sequence[int],
    *,
    device: torch.device | str | None = None,
) -> MultiAxisPattern:
    """MaxViT's block and grid attention as block-sparse layouts under token permutations.

    Args:
        height, width: the token grid; ``T = height * width`` tokens in raster order.
        block: the block-attention window ``Ph`` or ``(Ph, Pw)``; ``height % Ph == 0`` and
            ``width % Pw == 0``.
        grid: the grid-attention grid ``G`` or ``(Gh, Gw)``; ``height % Gh == 0`` and
            ``width % Gw == 0``. Grid groups are strided by ``(height / Gh, width / Gw)``.
        device: where the layouts and permutations live.

    Returns:
        A :class:`MultiAxisPattern`: ``permute(x, axis)`` / ``unpermute(x, axis)`` move
        ``[B, T, ...]`` tensors between raster order and the axis' order, and
        ``block_layout`` / ``grid_layout`` (or ``layout(axes)`` per head) are the
        block-diagonal layouts with full blocks in those orders.

    Window order (MaxViT ``window_partition``): position
    ``((y // Ph) * (width / Pw) + x // Pw) * Ph * Pw + (y % Ph) * Pw + x % Pw``.
    Grid order (MaxViT ``grid_partition``): position
    ``((y % Sh) * Sw + x % Sw) * Gh * Gw + (y // Sh) * Gw + x // Sw`` with
    ``(Sh, Sw) = (height / Gh, width / Gw)``.

    Example::

        >>> import torch, tokenmix
        >>> pat = tokenmix.patterns.multi_axis(8, 8, block=4, grid=2)
        >>> q = k = v = torch.randn(1, 64, 2, 16)
        >>> out = pat.unpermute(tokenmix.block_sparse_attention(
        ...     pat.permute(q, "grid"), pat.permute(k, "grid"), pat.permute(v, "grid"),
        ...     pat.grid_layout), "grid")
        >>> out.shape, pat.grid_layout.block_size
        (torch.Size([1, 64, 2, 16]), (4, 4))
    """
    height, width, (ph, pw), (gh, gw) = _geometry(height, width, block, grid)
    device = torch.device(device) if device is not None else torch.device("cpu")
    raster = torch.arange(height * width, device=device).view(height, width)
    window = raster.view(height // ph, ph, width // pw, pw).permute(0, 2, 1, 3).reshape(-1)
    sh, sw = height // gh, width // gw
    gridded = raster.view(gh, sh, gw, sw).permute(1, 3, 0, 2).reshape(-1)
    order = {"block": window.contiguous(), "grid": gridded.contiguous()}
    inverse = {a: torch.argsort(o) for a, o in order.items()}
    t = height * width
    block_layout = _diagonal_layout([ph * pw], ph * pw, t, device)
    grid_layout = _diagonal_layout([gh * gw], gh * gw, t, device)
    return MultiAxisPattern(
        height=height,
        width=width,
        block=(ph, pw),
        grid=(gh, gw),
        order=order,
        inverse=inverse,
        block_layout=block_layout,
        grid_layout=grid_layout,
    )
