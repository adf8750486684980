"""Neighborhood-attention test problems shared by the CPU-kernel tests and the emulated CUDA-kernel
tests: a configuration dict and seeded inputs for it."""

from __future__ import annotations

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
