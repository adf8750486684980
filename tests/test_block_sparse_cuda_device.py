"""tokenmix.block_sparse_attention on a real CUDA device: the block-sparse kernels of the CUDA
engine against the float64 reference, forward and backward (LSE included), in both backward
modes, every dtype. Skipped (and reported as skipped) on machines without a GPU, such as this
project's build machines, where tests/test_block_sparse_cuda_emulated.py runs the same kernel
source on the SIMT emulator instead."""

from __future__ import annotations

import pytest
import tokenmix
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available()
    or not tokenmix._ops.build_info().get("cuda_built")
    or not hasattr(torch.ops.tokenmix, "block_sparse_forward"),
    reason="needs a CUDA device and a tokenmix build with CUDA kernels",
)

TOL = {torch.float32: 2e-4, torch.float16: 1.5e-2, torch.bfloat16: 5e-2}


def _layouts():
    from tokenmix.block_sparse.layout import BlockLayout
    from tokenmix.block_sparse.mask import ElementMask
    from torch.nn.attention.flex_attention import create_block_mask

    docs = torch.tensor([[0] * 300 + [1] * 500 + [2] * 224])
    yield (
        1024,
        1024,
        BlockLayout.from_element_mask(
            ElementMask.causal(), q_len=1024, kv_len=1024, block_size=128
        ),
    )
    yield (
        700,
        1300,
        BlockLayout.from_element_mask(
            ElementMask.sliding_window(left=256, offset=600),
            q_len=700,
            kv_len=1300,
            block_size=(64, 96),
        ),
    )
    yield (
        1024,
        1024,
        BlockLayout.from_element_mask(
            ElementMask.document(docs, causal=True), q_len=1024, kv_len=1024, block_size=64
        ),
    )
    # Attention sinks: a causal prefix longer than a block (early queries see no later sink).
    yield (
        1024,
        1024,
        BlockLayout.from_element_mask(
            ElementMask(band=(-255, 0), prefix=100, prefix_causal=True),
            q_len=1024,
            kv_len=1024,
            block_size=64,
        ),
    )

    def mask_mod(b, h, q_idx, kv_idx):
        return ((q_idx * 7 + kv_idx * 3 + h) % 5 != 0) & (kv_idx <= q_idx + 40)

    bm = create_block_mask(mask_mod, 1, 4, 500, 600, device="cpu", BLOCK_SIZE=(16, 32))
    yield 500, 600, BlockLayout.from_block_mask(bm, batch=1, heads=4)


LAYOUTS = list(_layouts()) if torch.cuda.is_available() else []
DIMS = [(64, 64), (128, 128), (40, 24)]


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("dims", DIMS, ids=[f"d{d}-dv{dv}" for d, dv in DIMS])
@pytest.mark.parametrize("index", range(5))
def test_cuda_matches_reference(index, dims, dtype, deterministic):
    from tokenmix.block_sparse.reference import block_sparse_attention_reference

    q_len, kv_len, layout = LAYOUTS[index]
    d, dv = dims
    gen = torch.Generator().manual_seed(index)
    q = torch.randn(1, q_len, 4, d, generator=gen).to(dtype)
    k = torch.randn(1, kv_len, 2, d, generator=gen).to(dtype)
    v = torch.randn(1, kv_len, 2, dv, generator=gen).to(dtype)
    grad_out = torch.randn(1, q_len, 4, dv, generator=gen, dtype=torch.float64)
    cuda = [x.cuda().requires_grad_() for x in (q, k, v)]
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = tokenmix.block_sparse_attention(*cuda, layout.to("cuda"))
        grads = torch.autograd.grad(out, cuda, grad_out.to(out))
    finally:
        torch.use_deterministic_algorithms(False)
    want = block_sparse_attention_reference(*ref, layout)
    want_grads = torch.autograd.grad(want, ref, grad_out)
    for name, got, w in zip(
        ("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads), strict=True
    ):
        assert torch.isfinite(got).all(), name
        err = ((got.double().cpu() - w).abs().max() / w.abs().max().clamp_min(1.0)).item()
        assert err <= TOL[dtype], (name, err)
