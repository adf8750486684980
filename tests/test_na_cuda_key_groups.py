"""Key-group skipping of the CUDA attention engine, on the emulated neighborhood kernels.

In a partial chunk a warp computes only the 16-key groups that one of its 16 query rows keeps
(online_softmax.h kept_groups). ``tokenmix.plan``'s ``chunked_pairs`` counts those groups, so the
tensor-core instructions the emulated fp16 forward runs must be exactly the planner's count: 16
``mma.sync`` per (warp, group) at head dim 64 (Q K^T: 4 k-steps x 2; P V: 8 output tiles). The
outputs must still match the float64 reference.
"""

from __future__ import annotations

import math
import os

import pytest
import tokenmix
import torch
from na_cases import attend, make_cfg, make_inputs, window_of
from tokenmix.neighborhood.reference import neighborhood_attention_reference

LIBRARY = os.path.join(os.path.dirname(tokenmix.__file__), "_emulated.so")
MMA_PER_GROUP = 16  # fp16, D = Dv = 64: Q K^T 4 k-steps x 2 tiles, P V 8 tiles

CASES = {
    # 8x8 tiles, 20 = 8 + 8 + 4: the edge tiles have padding rows (and a warp of them only)
    "2d-k7-padded": make_cfg((20, 20), 7, dim=64),
    "1d-k13-causal": make_cfg((150,), 13, dim=64, causal=(True,)),
    "3d-k5-gqa": make_cfg((9, 10, 9), 5, heads=2, heads_kv=1, dim=64),
    "2d-strided-dilated": make_cfg((24, 22), (9, 7), stride=(2, 1), dilation=(1, 2), dim=64),
}


@pytest.fixture(scope="module", autouse=True)
def emulated_library():
    torch.ops.load_library(LIBRARY)


def rounded_box_pairs(p: tokenmix.NeighborhoodPlan, chunk: int = 64) -> int:
    """Pairs without key-group skipping: every tile's rows times its box in whole chunks."""
    total = 0
    for _, _, _, begin, end in p.query_tiles().tolist():
        box = math.prod(e - b for b, e in zip(begin, end, strict=True))
        total += math.prod(p.tile_shape) * -(-box // chunk) * chunk
    return total


@pytest.mark.parametrize("name", list(CASES))
def test_forward_mma_count_is_the_planners(name):
    c = CASES[name]
    t = make_inputs(c, torch.float16, seed=3)
    kernel, stride, dilation, causal = window_of(c)
    window = [list(kernel), list(stride), list(dilation), [int(x) for x in causal]]
    ops = torch.ops.tokenmix_emulated
    before = ops.mma_count()
    out, lse = ops.na_forward(t["q"], t["k"], t["v"], None, None, None, *window, 0.125)
    mma = ops.mma_count() - before

    p = tokenmix.plan(c["shape"], kernel, stride, dilation, causal)
    per_head = p.chunked_pairs // 256
    assert p.chunked_pairs % 256 == 0
    assert mma == MMA_PER_GROUP * per_head * c["batch"] * c["heads"]
    # the skipping is real: fewer groups than whole chunks of every tile's key box
    assert p.chunked_pairs < rounded_box_pairs(p)

    leaves = {n: x.double() for n, x in t.items() if x is not None}
    r_out, r_lse = attend(neighborhood_attention_reference, c, leaves, scale=0.125, return_lse=True)
    assert ((out.double() - r_out).abs().max() / r_out.abs().max()).item() <= 1e-2
    assert (lse.double() - r_lse).abs().max().item() <= 1e-2


def test_2d_k7_efficiency_in_the_kernels_chunks():
    # The case of issue 12: 64x64, window 7x7, 8x8 tiles of 4 warps (2x8 queries each), 196-key
    # boxes. Whole 64-key chunks made 21.9% of the computed pairs useful; per-warp groups 41.8%.
    p = tokenmix.plan((64, 64), 7)
    assert rounded_box_pairs(p) == 917_504  # mostly four chunks per box, per (batch, head)
    assert round(100 * p.useful_pairs / rounded_box_pairs(p), 1) == 21.9
    assert round(100 * p.chunk_efficiency, 1) == 41.8
