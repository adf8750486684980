"""Neighborhood-attention test problems shared by the CPU-kernel tests and the emulated CUDA-kernel
tests: a configuration dict and seeded inputs for it."""

from __future__ import annotations

import random

import torch


def _tup(x, rank):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,) * rank


def make_cfg(
    shape,
    kernel,
    stride=1,
    dilation=1,
    causal=False,
    heads=2,
    heads_kv=None,
    dim=16,
    dim_v=None,
    batch=1,
    rpb=False,
    n_extra=None,
    scale=None,
):
    rank = len(shape)
    return dict(
        shape=tuple(shape),
        kernel=_tup(kernel, rank),
        stride=_tup(stride, rank),
        dilation=_tup(dilation, rank),
        causal=_tup(causal, rank),
        heads=heads,
        heads_kv=heads if heads_kv is None else heads_kv,
        dim=dim,
        dim_v=dim if dim_v is None else dim_v,
        batch=batch,
        rpb=rpb,
        n_extra=n_extra,  # None: no additional tokens; 0 is allowed
        scale=scale,
    )


def make_inputs(cfg, dtype, seed):
    """Inputs drawn in float64 then rounded to ``dtype``: name -> tensor (or None)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    b, s, h, hkv = cfg["batch"], cfg["shape"], cfg["heads"], cfg["heads_kv"]
    t = dict(
        q=rand(b, *s, h, cfg["dim"]),
        k=rand(b, *s, hkv, cfg["dim"]),
        v=rand(b, *s, hkv, cfg["dim_v"]),
        rpb=rand(h, *(2 * x - 1 for x in cfg["kernel"])) if cfg["rpb"] else None,
        additional_keys=None,
        additional_values=None,
    )
    if cfg["n_extra"] is not None:
        t["additional_keys"] = rand(b, cfg["n_extra"], hkv, cfg["dim"])
        t["additional_values"] = rand(b, cfg["n_extra"], hkv, cfg["dim_v"])
    return t


def random_case(seed, head_dims, head_dims_3d, gqa_choices, max_pad=None):
    """A seeded random problem: rank 1 to 3, windows with stride, dilation and causal masking,
    GQA from `gqa_choices`, head dims from `head_dims` (`head_dims_3d` for rank 3), rpb, extra
    tokens and a custom scale at random. `max_pad` (per rank) bounds the input beyond the window."""
    rng = random.Random(seed)
    rank = seed % 3 + 1
    max_kernel = {1: 9, 2: 5, 3: 3}[rank]
    max_pad = (max_pad or {1: 30, 2: 7, 3: 3})[rank]
    kernel, stride, dilation, causal, shape = [], [], [], [], []
    for _ in range(rank):
        k = rng.randint(2, max_kernel)
        d = rng.choice([1, 1, 2, 3]) if rank < 3 else rng.choice([1, 1, 2])
        kernel.append(k)
        dilation.append(d)
        stride.append(rng.choice([1, 1, rng.randint(1, k), k]))
        causal.append(rng.random() < 0.3)
        shape.append(k * d + rng.randint(0, max_pad))
    heads, heads_kv = rng.choice(gqa_choices)
    dims = head_dims if rank < 3 else head_dims_3d
    dim = rng.choice(dims)
    dim_v = rng.choice([dim, dim, rng.choice(dims)])
    return make_cfg(
        shape,
        kernel,
        stride,
        dilation,
        causal,
        heads=heads,
        heads_kv=heads_kv,
        dim=dim,
        dim_v=dim_v,
        batch=rng.choice([1, 2]),
        rpb=rng.random() < 0.5,
        n_extra=rng.choice([None, None, 1, 5]),
        scale=rng.choice([None, 0.3]),
    )


def window_of(cfg):
    """(kernel_size, stride, dilation, is_causal) of a case."""
    return cfg["kernel"], cfg["stride"], cfg["dilation"], cfg["causal"]


def attend(fn, cfg, leaves, **kwargs):
    """``fn`` (tokenmix.neighborhood_attention or the reference) on a case's tensors
    (a name -> tensor dict); ``scale`` defaults to the case's."""
    kwargs.setdefault("scale", cfg["scale"])
    return fn(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        *window_of(cfg),
        rpb=leaves.get("rpb"),
        additional_keys=leaves.get("additional_keys"),
        additional_values=leaves.get("additional_values"),
        **kwargs,
    )


def poisoned(t, name, index, value):
    """A copy of the input dict `t` whose tensor `name` holds `value` at `index`."""
    x = t[name].clone()
    x[index] = value
    return {**t, name: x}


def assert_same_nonfinite(got, want, tol, what):
    """`got` is non-finite exactly where `want` (the float64 reference) is, and elsewhere within
    `tol` of it (relative to max(1, max |want|) over the finite entries)."""
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {got.shape} != {want.shape}"
    bad_got, bad_want = ~torch.isfinite(got), ~torch.isfinite(want)
    if not torch.equal(bad_got, bad_want):
        leaked = (bad_got & ~bad_want).nonzero()[:4].tolist()
        lost = (bad_want & ~bad_got).nonzero()[:4].tolist()
        raise AssertionError(
            f"{what}: non-finite where the reference is finite at {leaked} "
            f"({int((bad_got & ~bad_want).sum())} in all), finite where it is not at {lost} "
            f"({int((bad_want & ~bad_got).sum())} in all)"
        )
    finite = ~bad_want
    if finite.any():
        w, g = want[finite].double(), got[finite].double()
        err = ((g - w).abs().max() / w.abs().max().clamp_min(1.0)).item()
        assert err <= tol, f"{what}: max error {err:.3e} > {tol:.1e} on the finite entries"
