"""Generalized neighborhood attention: the public functions."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .. import _ops
from . import ops as _ops_registered  # the autograd and fake kernels, and the op calls
from .args import (
    check_cuda_problem,
    check_tensors,
    normalize_window_args,
    resolve_scale,
    spatial_rank,
)
from .reference import neighborhood_attention_reference

IntOrTuple = int | Sequence[int]
BoolOrTuple = bool | Sequence[bool]


def neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    scale: float | None = None,
    rpb: Tensor | None = None,
    additional_keys: Tensor | None = None,
    additional_values: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Generalized neighborhood attention over 1, 2 or 3 spatial dimensions.

    ``q`` is ``[B, *spatial, H, D]``, ``k`` is ``[B, *spatial, H_kv, D]`` and ``v``
    is ``[B, *spatial, H_kv, Dv]`` with ``H % H_kv == 0``. ``kernel_size``,
    ``stride``, ``dilation`` and ``is_causal`` take one value or one per spatial
    dimension; the semantics are NATTEN 0.21's (docs/neighborhood_attention.md).
    ``rpb`` (``[H, 2k1-1, ...]``) is a relative-position bias added to the
    logits; ``additional_keys/values`` (``[B, N, H_kv, D/Dv]``) are attended by
    every query in the same softmax. Returns the output ``[B, *spatial, H, Dv]``
    and, with ``return_lse=True``, the fp32 log-sum-exp ``[B, *spatial, H]``.

    Example::

        >>> import torch, tokenmix
        >>> q = k = v = torch.randn(1, 16, 16, 2, 32)
        >>> tokenmix.neighborhood_attention(q, k, v, kernel_size=5).shape
        torch.Size([1, 16, 16, 2, 32])
    """
    rank = spatial_rank(q)
    kernel, stride_t, dilation_t, causal = normalize_window_args(
        rank, tuple(q.shape[1 : 1 + rank]), kernel_size, stride, dilation, is_causal
    )
    check_tensors(q, k, v, rank, rpb, additional_keys, additional_values, kernel_size=kernel)
    scale = resolve_scale(scale, q.shape[-1])

    require_kernels(q, v)
    out, lse = _ops_registered.forward(
        q,
        k,
        v,
        rpb,
        additional_keys,
        additional_values,
        (kernel, stride_t, dilation_t, causal, scale),
    )
    return (out, lse) if return_lse else out


def require_kernels(q: Tensor, v: Tensor) -> None:
    """A kernel for q's device in this build (the CUDA one's limits checked), or a clear error."""
    if q.device.type == "cuda":
        check_cuda_problem(q, v)
    elif q.device.type not in ("cpu", "meta"):
        raise NotImplementedError(
            f"tokenmix has no {q.device.type} kernel for neighborhood attention (see "
            "`python -m tokenmix info`); use "
            "tokenmix.neighborhood.reference.neighborhood_attention_reference on this device"
        )
    _ops.require_library()


def _fixed_rank(rank: int, name: str):
    def fn(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        dilation: IntOrTuple = 1,
        is_causal: BoolOrTuple = False,
        scale: float | None = None,
        rpb: Tensor | None = None,
        additional_keys: Tensor | None = None,
        additional_values: Tensor | None = None,
        return_lse: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if isinstance(q, Tensor) and q.dim() != rank + 3:
            raise ValueError(
                f"{name} expects q of shape [B, {', '.join(f'S{i}' for i in range(rank))}, H, D] "
                f"({rank + 3} dimensions), got shape {tuple(q.shape)}"
            )
        return neighborhood_attention(
            q,
            k,
            v,
            kernel_size,
            stride,
            dilation,
            is_causal,
            scale,
            rpb,
            additional_keys,
            additional_values,
            return_lse,
        )

    fn.__name__ = name
    fn.__qualname__ = name
    fn.__doc__ = f"{rank}-D neighborhood attention; see :func:`neighborhood_attention`."
    return fn


na1d = _fixed_rank(1, "na1d")
na2d = _fixed_rank(2, "na2d")
na3d = _fixed_rank(3, "na3d")

__all__ = [
    "na1d",
    "na2d",
    "na3d",
    "neighborhood_attention",
    "neighborhood_attention_reference",
]
