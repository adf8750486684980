"""tokenmix.na1d/na2d/na3d on a real CUDA device: the fused kernels against the float64 reference,
forward and backward, in both backward modes. Skipped (and reported as skipped) on machines
without a GPU, such as this project's build machines, where tests/test_na_cuda_emulated.py runs the
same kernel source on the SIMT emulator instead."""

from __future__ import annotations

import pytest
import tokenmix
import torch
from na_cases import attend, make_cfg, make_inputs
from tokenmix.neighborhood.reference import neighborhood_attention_reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not tokenmix._ops.build_info().get("cuda_built"),
    reason="needs a CUDA device and a tokenmix build with CUDA kernels",
)

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
CASES = [
    make_cfg((70,), 7, dim=32),
    make_cfg((9, 11), (3, 5), stride=(2, 1), dim=16, rpb=True),
    make_cfg((5, 6, 7), 3, dilation=(1, 2, 1), causal=(True, False, False), dim=8, rpb=True),
    make_cfg((13, 6), (3, 3), heads=4, heads_kv=2, dim=24, dim_v=40, n_extra=5),
    make_cfg((24, 24), (7, 7), dim=128, heads=2, batch=2, rpb=True),
]


def _max_rel_err(got, want):
    return ((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("index", range(len(CASES)))
def test_cuda_matches_reference(index, dtype, deterministic):
    c = CASES[index]
    t = make_inputs(c, dtype, seed=index)
    gen = torch.Generator().manual_seed(index + 1)
    grad_out = torch.randn(
        (c["batch"], *c["shape"], c["heads"], c["dim_v"]), generator=gen, dtype=torch.float64
    )
    cuda = {n: x.cuda().requires_grad_() for n, x in t.items() if x is not None}
    ref = {n: x.double().requires_grad_() for n, x in t.items() if x is not None}
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = attend(tokenmix.neighborhood_attention, c, cuda)
        grads = torch.autograd.grad(out, list(cuda.values()), grad_out.to(out))
    finally:
        torch.use_deterministic_algorithms(False)
    want = attend(neighborhood_attention_reference, c, ref)
    want_grads = torch.autograd.grad(want, list(ref.values()), grad_out)
    assert _max_rel_err(out, want) <= TOL[dtype]
    for name, got, w in zip(cuda, grads, want_grads, strict=True):
        assert torch.isfinite(got).all(), name
        assert _max_rel_err(got, w) <= TOL[dtype], name


# The sm_90a (wgmma) forward: fixed head dims 32, 64 and 128 (D = Dv), fp16 / bf16.
WGMMA_CASES = [
    make_cfg((24, 24), (7, 7), dim=32, heads=2, batch=2, rpb=True),
    make_cfg((70,), 9, dim=64, heads=4, heads_kv=2, n_extra=5),
    make_cfg((5, 6, 7), 3, dilation=(1, 2, 1), causal=(True, False, False), dim=128),
]


def _forward_kernels(fn) -> set[str]:
    """Names of the CUDA kernels fn() launches (the profiler's)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if "na_forward" in e.name}


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="the sm_90a forward runs on compute capability 9.0 only",
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("index", range(len(WGMMA_CASES)))
def test_sm90a_forward_runs_and_matches_reference(index, dtype, monkeypatch):
    # On an H100/H200, TOKENMIX_WGMMA=1 takes the wgmma kernel and 0 keeps mma.sync. Both match
    # the float64 reference.
    c = WGMMA_CASES[index]
    t = make_inputs(c, dtype, seed=index)
    cuda = {n: x.cuda() for n, x in t.items() if x is not None}
    want = attend(
        neighborhood_attention_reference, c, {n: x.double() for n, x in t.items() if x is not None}
    )
    for wgmma in ("1", "0"):
        monkeypatch.setenv("TOKENMIX_WGMMA", wgmma)
        out: list[torch.Tensor] = []

        def run(out=out):
            out.append(attend(tokenmix.neighborhood_attention, c, cuda))

        kernels = _forward_kernels(run)
        ran_wg = any("na_forward_wg_kernel" in k for k in kernels)
        assert kernels and ran_wg == (wgmma == "1"), (wgmma, kernels)
        assert _max_rel_err(out[0], want) <= TOL[dtype], wgmma


# The launcher's own choice on compute capability 9.0 ($TOKENMIX_WGMMA unset): the kernel
# tokenmix.plan reports (tokenmix/neighborhood_chunking.h).
AUTO_CASES = [
    (make_cfg((150,), 127, dim=64), "wgmma"),
    (make_cfg((20, 20), 7, dim=64), "mma.sync"),
    (make_cfg((20, 20), 13, dim=128), "wgmma"),
]


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="the choice of the sm_90a forward is made on compute capability 9.0 only",
)
@pytest.mark.parametrize("index", range(len(AUTO_CASES)))
def test_sm90a_choice_is_the_plans(index, monkeypatch):
    c, kernel_name = AUTO_CASES[index]
    monkeypatch.delenv("TOKENMIX_WGMMA", raising=False)
    p = tokenmix.plan(c["shape"], c["kernel"], head_dim=c["dim"], compute_capability=(9, 0))
    assert p.cuda_forward == kernel_name
    t = make_inputs(c, torch.float16, seed=index)
    cuda = {n: x.cuda() for n, x in t.items() if x is not None}
    out: list[torch.Tensor] = []

    def run():
        out.append(attend(tokenmix.neighborhood_attention, c, cuda))

    kernels = _forward_kernels(run)
    ran_wg = any("na_forward_wg_kernel" in k for k in kernels)
    assert kernels and ran_wg == (kernel_name == "wgmma"), kernels
    want = attend(
        neighborhood_attention_reference, c, {n: x.double() for n, x in t.items() if x is not None}
    )
    assert _max_rel_err(out[0], want) <= TOL[torch.float16]
