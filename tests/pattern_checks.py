"""Checks shared by the pattern tests (tests/test_patterns_*.py).

Every pattern test builds its expected mask directly from the documented formula, token by
token, with its own code (never the builder's), and hands it here with the builder's layout and
mask_mod:

* ``check_layout``: ``layout.dense_mask()`` equals the expected mask; the mask_mod evaluated
  densely equals it; FlexAttention's ``create_block_mask`` on the mask_mod agrees (same kept
  elements, same skipped blocks, and every block the layout calls full is full for Flex too);
  the layout's block classification is consistent with the mask (full blocks keep everything,
  skipped blocks nothing); ``layout.to_block_mask()`` round-trips.
* ``check_attention``: ``tokenmix.block_sparse_attention`` (the CPU kernels) against the
  reference, forward (output and LSE) and backward, and the reference against a dense masked
  softmax over the expected mask.
* ``MaxTensorSize``: records the largest tensor any torch op produces (builders must never
  make a T x T one).
"""

from __future__ import annotations

import tokenmix
import torch
from tokenmix import BlockLayout
from tokenmix.block_sparse import block_sparse_attention_reference
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def mask_mod_dense(mask_mod, heads: int, T: int) -> torch.Tensor:
    """``mask_mod`` on every (head, q, k): bool ``[heads, T, T]``."""
    b = torch.zeros((), dtype=torch.int64)
    h = torch.arange(heads).view(-1, 1, 1)
    q = torch.arange(T).view(1, -1, 1)
    k = torch.arange(T).view(1, 1, -1)
    out = mask_mod(b, h, q, k)
    return torch.broadcast_to(out, (heads, T, T))


def block_any_all(mask: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block pair of a ``[H, T, T]`` mask: whether it keeps any / every element."""
    heads, T, _ = mask.shape
    n = -(-T // block)
    pad = n * block - T
    # Padding counts as "kept" for the all-test and "not kept" for the any-test.
    padded_any = torch.nn.functional.pad(mask, (0, pad, 0, pad), value=False)
    padded_all = torch.nn.functional.pad(mask, (0, pad, 0, pad), value=True)
    shape = (heads, n, block, n, block)
    return (
        padded_any.view(shape).any(4).any(2),
        padded_all.view(shape).all(4).all(2),
    )


def check_layout(
    layout: BlockLayout, expected: torch.Tensor, mask_mod, *, block_size: int, flex: bool = True
) -> None:
    """``expected``: bool ``[H, T, T]`` from the formula (H = 1 for head-shared patterns)."""
    heads, T, _ = expected.shape
    assert layout.seq_lengths == (T, T)
    assert layout.block_size == (block_size, block_size)
    assert layout.heads == heads and layout.batch == 1
    dense = layout.dense_mask()
    assert dense.shape == (1, heads, T, T)
    mismatch = (dense[0] != expected).nonzero()
    assert mismatch.numel() == 0, f"layout differs from the formula at (h, q, k) {mismatch[:5]}"
    from_mod = mask_mod_dense(mask_mod, heads, T)
    mismatch = (from_mod != expected).nonzero()
    assert mismatch.numel() == 0, f"mask_mod differs from the formula at {mismatch[:5]}"
    # The block classification: full blocks keep every element, skipped ones none.
    any_keep, all_keep = block_any_all(expected, block_size)
    status = layout.block_status()[0].long()
    assert torch.equal(status == 0, ~any_keep), "a block with kept elements is skipped (or v.v.)"
    assert not ((status == 2) & ~all_keep).any(), "a block called full drops elements"
    if not flex:
        return
    bm = create_block_mask(
        mask_mod, None, heads if heads > 1 else None, T, T, device="cpu", BLOCK_SIZE=block_size
    )
    flex_layout = BlockLayout.from_block_mask(bm)
    assert torch.equal(flex_layout.dense_mask()[0].expand(heads, T, T), expected)
    flex_status = flex_layout.block_status()[0].long().expand_as(status)
    assert torch.equal(flex_status == 0, status == 0), "skipped blocks differ from Flex's"
    # Flex pads a ragged last block with dropped elements (so never calls it full); compare the
    # other blocks.
    inner = (status == 2) & (flex_status != 2)
    if T % block_size:
        inner = inner[:, :-1, :-1]
    assert not inner.any(), "a full block is not full for Flex"
    # And back: the layout as a Flex BlockMask keeps the same elements.
    back = BlockLayout.from_block_mask(layout.to_block_mask(), heads=heads)
    assert torch.equal(back.dense_mask()[0].expand(heads, T, T), expected)


def _dense_attention(q, k, v, keep, scale):
    """Masked softmax attention over ``keep`` ``[H, T, T]`` in float64 (rows keeping nothing:
    output 0, LSE -inf)."""
    group = q.shape[2] // k.shape[2]
    kx = k.repeat_interleave(group, dim=2)
    vx = v.repeat_interleave(group, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, kx) * scale
    logits = logits.masked_fill(~keep.unsqueeze(0), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(logits - safe.unsqueeze(-1)).masked_fill(~keep.unsqueeze(0), 0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vx), lse.transpose(1, 2)


def check_attention(layout: BlockLayout, expected: torch.Tensor, *, seed: int = 0) -> None:
    """The kernels against the reference (forward and backward) on ``layout``, and the
    reference against dense attention over the formula's mask ``expected`` ``[H, T, T]``."""
    T = expected.shape[1]
    heads = layout.heads if layout.heads > 1 else 4
    kv_heads = 2 if heads % 2 == 0 else 1
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, T, heads, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, T, kv_heads, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, T, kv_heads, 8, generator=g, dtype=torch.float64)
    go = torch.randn(2, T, heads, 8, generator=g, dtype=torch.float64)
    gl = torch.randn(2, T, heads, generator=g, dtype=torch.float64)

    def run(fn):
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        out, lse = fn(qq, kk, vv)
        finite = torch.isfinite(lse)
        loss = (out * go).sum() + torch.where(finite, lse * gl, torch.zeros_like(lse)).sum()
        loss.backward()
        return out.detach(), lse.detach(), qq.grad, kk.grad, vv.grad

    scale = 16**-0.5
    got = run(lambda a, b, c: tokenmix.block_sparse_attention(a, b, c, layout, return_lse=True))
    ref = run(lambda a, b, c: block_sparse_attention_reference(a, b, c, layout, return_lse=True))
    dense = run(lambda a, b, c: _dense_attention(a, b, c, expected.expand(heads, T, T), scale))
    names = ("out", "lse", "dq", "dk", "dv")
    for name, x, y, z in zip(names, got, ref, dense, strict=True):
        torch.testing.assert_close(x, y, atol=1e-9, rtol=1e-9, msg=f"kernel vs reference: {name}")
        torch.testing.assert_close(y, z, atol=1e-9, rtol=1e-9, msg=f"reference vs dense: {name}")


class MaxTensorSize(TorchDispatchMode):
    """Records the largest number of elements of any tensor produced inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def check_layer_against(out, ref, x, layer, *, atol_out=1e-10, atol_grad=1e-9) -> None:
    """A layer's output and the gradients of x and its parameters equal a reference's."""
    torch.testing.assert_close(out, ref, atol=atol_out, rtol=atol_out)
    w = torch.randn_like(out)
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad((out * w).sum(), params)
    ref_grads = torch.autograd.grad((ref * w).sum(), params)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=atol_grad, rtol=atol_grad)


def check_compiled_matches_eager(layer, x, *, fullgraph: bool):
    """One eager call (it builds and caches the layout outside the compiled region), then the
    compiled layer's output and parameter gradients equal the eager ones. Returns the compiled
    layer."""
    eager = layer(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=fullgraph)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for g, p in zip(grads, layer.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)
    return compiled
