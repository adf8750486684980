"""Linear attention and the (gated) delta rule: the public functions.

On CPU, when tokenmix's fused kernels are built (``ops.kernels_available()``), the
scans run in the fused C++ kernels (forward and backward). On CUDA, float32/float16/
bfloat16 scans with head dim K <= ``ops.CUDA_MAX_KEY_DIM`` run in tokenmix's CUDA
kernels in a build that has them. Everything else runs the chunked pure-PyTorch
implementation (:mod:`.chunked`). All compute the recurrences of :mod:`.reference`
(docs/linear_attention.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._cuda_driver import cuda_kernels_usable as _cuda_kernels_usable
from . import ops
from .args import accumulation_dtype, check_delta_rule, check_linear_attention, check_step
from .chunked import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SUBCHUNK_SIZE,
    bidirectional_linear_attention,
    check_chunk_sizes,
    chunked_delta_scan,
    chunked_linear_scan,
)
from .reference import empty_result

# scan(q, k, v, g, gk, initial_state, cu_seqlens, scale) -> (o, final_state)
LinearScan = Callable[..., tuple[Tensor, Tensor]]

__all__ = [
    "chunked_delta_rule",
    "chunked_linear_attention",
    "delta_rule",
    "delta_rule_from_scan",
    "delta_rule_step",
    "fused_kernels_available",
    "linear_attention",
    "linear_attention_from_scan",
    "linear_attention_step",
]


def fused_kernels_available() -> bool:
    """Whether CPU inputs run in tokenmix's fused linear-scan kernels."""
    return ops.kernels_available()


def _device_smem_bytes(device: torch.device) -> int:
    """Shared memory a block may opt in to on ``device`` (bytes)."""
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin:
        return int(optin)
    # torch builds without the property: the architectures' documented maxima.
    major, minor = props.major, props.minor
    if (major, minor) == (8, 0):
        return 163 * 1024
    if major in (9, 10):
        return 227 * 1024
    return 99 * 1024  # sm_86, sm_87, sm_89, sm_120 and anything unknown


def _fused(q: object, delta: bool, backward: bool) -> bool:
    """Whether a scan on q runs tokenmix's kernels: CPU tensors when the kernels are built;
    CUDA tensors of float32/float16/bfloat16 with K <= ops.CUDA_MAX_KEY_DIM whose kernels (the
    backward's too when a gradient will be needed) fit the device's shared memory, in a build
    with CUDA kernels and a driver that can run them. Anything else (including malformed
    input, whose validation names the argument) reaches the chunked path."""
    if not isinstance(q, Tensor) or not ops.kernels_available():
        return False
    if q.device.type == "cpu":
        return True
    if q.device.type != "cuda" or q.dtype == torch.float64 or q.dim() != 4:
        return False
    if q.shape[-1] > ops.CUDA_MAX_KEY_DIM or not _cuda_kernels_usable():
        return False
    needed = ops.cuda_smem_bytes(q.shape[-1], delta=delta, backward=backward)
    return needed <= _device_smem_bytes(q.device)


def _needs_backward(*inputs: object) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(x, Tensor) and x.requires_grad for x in inputs
    )


def _pick_scan(q: object, delta: bool, *inputs: object) -> Callable:
    # The fused entry points fix feature strides themselves.
    if _fused(q, delta, _needs_backward(q, *inputs)):
        return ops.fused_delta_rule if delta else ops.fused_linear_scan
    return chunked_delta_scan if delta else chunked_linear_scan


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
) -> tuple[Tensor, Tensor | None]:
    """Linear attention, optionally decayed: plain, RetNet, simple GLA / Mamba2, GLA.

    Per sequence and head, with the state ``S`` (``K x V``) starting at
    ``initial_state`` (or zeros)::

        S_t = A_t S_{t-1} + k_t v_t^T        o_t = (scale q_t)^T S_t

    where ``A_t`` is ``1`` (no decay), ``exp(g_gamma[h])`` (fixed per-head log decay,
    RetNet), ``exp(g_t)`` (scalar log decay, simple GLA / Mamba2 SSD) or
    ``diag(exp(gk_t))`` (per-key log gates, GLA). At most one of ``g``, ``g_gamma``,
    ``gk``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (float32/float64/float16/bfloat16).
        g: ``[B, T, H]``; g_gamma: ``[H]``; gk: ``[B, T, H, K]``. Log decays (``<= 0``
            keeps the state bounded), in q's dtype or float32.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (``[N, H, K, V + 1]`` with ``normalize``),
            N = B or the number of sequences.
        output_final_state: also return the final states (same shape).
        cu_seqlens: int32/int64 ``[N + 1]``: B must be 1 and sequence ``i`` is
            tokens ``[cu_seqlens[i], cu_seqlens[i+1])`` with its own state.
        normalize: divide ``o_t`` by ``(scale q_t) . z_t + 1e-10`` with ``z_t`` the
            (equally decayed) running key sum. The state then carries ``z`` as an
            extra value column, so prefill and decoding compose as without it.
        causal: ``False`` (bidirectional, no decay only) gives every token its
            sequence's final state: ``o_t = (scale q_t)^T S_T``.

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in q's dtype; final_state float32
        (float64 for float64 inputs) when ``output_final_state``, else None.

    Example::

        >>> import torch
        >>> from tokenmix.linear_scan import linear_attention
        >>> q, k = torch.randn(2, 100, 4, 32), torch.randn(2, 100, 4, 32)
        >>> v = torch.randn(2, 100, 4, 48)
        >>> g = torch.nn.functional.logsigmoid(torch.randn(2, 100, 4))  # simple GLA
        >>> o, state = linear_attention(q, k, v, g=g, output_final_state=True)
        >>> o.shape, state.shape, state.dtype
        (torch.Size([2, 100, 4, 48]), torch.Size([2, 4, 32, 48]), torch.float32)
    """
    scan = _pick_scan(q, False, k, v, g, g_gamma, gk, initial_state)
    return linear_attention_from_scan(
        scan,
        q,
        k,
        v,
        g=g,
        g_gamma=g_gamma,
        gk=gk,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        normalize=normalize,
        causal=causal,
    )


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
) -> tuple[Tensor, Tensor | None]:
    """The delta rule (DeltaNet), or with ``g`` the gated delta rule (Gated DeltaNet).

    Per sequence and head::

        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
        o_t = (scale q_t)^T S_t

    (``exp(g_t) = 1`` without ``g``). Keys are usually L2-normalized and
    ``0 <= beta <= 1`` (up to 2 keeps the transition contractive); neither is
    enforced.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        beta: ``[B, T, H]``; g: ``[B, T, H]`` log decay or None. In q's dtype or
            float32.
        scale, initial_state, output_final_state, cu_seqlens: as in
            :func:`linear_attention`.

    Returns:
        ``(o, final_state)`` as in :func:`linear_attention`.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from tokenmix.linear_scan import delta_rule
        >>> q = torch.randn(1, 64, 2, 16)
        >>> k = F.normalize(torch.randn(1, 64, 2, 16), dim=-1)
        >>> v = torch.randn(1, 64, 2, 16)
        >>> beta, g = torch.rand(1, 64, 2), F.logsigmoid(torch.randn(1, 64, 2))
        >>> cu_seqlens = torch.tensor([0, 20, 64])  # two packed sequences
        >>> o, state = delta_rule(q, k, v, beta, g=g, cu_seqlens=cu_seqlens,
        ...                       output_final_state=True)
        >>> o.shape, state.shape
        (torch.Size([1, 64, 2, 16]), torch.Size([2, 2, 16, 16]))
    """
    scan = _pick_scan(q, True, k, v, beta, g, initial_state)
    return delta_rule_from_scan(
        scan,
        q,
        k,
        v,
        beta,
        g=g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


def linear_attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: Tensor | None,
    *,
    g: Tensor | None = None,
    g_gamma: Tensor | None = None,
    gk: Tensor | None = None,
    scale: float | None = None,
    normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """One decoding step of :func:`linear_attention` (causal).

    ``q``, ``k`` are ``[N, H, K]``, ``v`` ``[N, H, V]``, ``state`` ``[N, H, K, V]``
    (None: zeros), ``g`` ``[N, H]``, ``g_gamma`` ``[H]``, ``gk`` ``[N, H, K]``.
    With ``normalize=True`` the state is ``[N, H, K, V + 1]``, as the normalized
    scan returns it (its last column is the decayed key sum).
    Returns ``(o [N, H, V] in q's dtype, new_state)`` with the new state in float32
    (float64 for float64 inputs); ``state`` is not modified. Running the scan over
    a prefix and then one step per token equals the scan over the whole sequence.

    Example::

        >>> import torch
        >>> from tokenmix.linear_scan import linear_attention, linear_attention_step
        >>> q, k, v = (torch.randn(1, 9, 2, 8, dtype=torch.float64) for _ in range(3))
        >>> g = -torch.rand(1, 9, 2, dtype=torch.float64)
        >>> o, s = linear_attention(q[:, :8], k[:, :8], v[:, :8], g=g[:, :8],
        ...                         output_final_state=True)
        >>> o9, s = linear_attention_step(q[:, 8], k[:, 8], v[:, 8], s, g=g[:, 8])
        >>> full, _ = linear_attention(q, k, v, g=g)
        >>> torch.allclose(o9, full[:, 8])
        True
    """
    scale = check_step(
        q, k, v, state, g=g, g_gamma=g_gamma, gk=gk, scale=scale, normalize=normalize
    )
    acc = accumulation_dtype(q.dtype)
    if normalize:  # the key sum rides along as a value column of ones
        v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
    num, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    if state is None:
        state = torch.zeros(num, heads, dim_k, dim_v, dtype=acc, device=q.device)
    else:
        state = state.to(acc)
    if g_gamma is not None:
        state = state * g_gamma.to(acc).exp()[None, :, None, None]
    elif g is not None:
        state = state * g.to(acc).exp()[..., None, None]
    elif gk is not None:
        state = state * gk.to(acc).exp()[..., None]
    kf, vf = k.to(acc), v.to(acc)
    state = state + kf[..., :, None] * vf[..., None, :]
    o = torch.einsum("nhk,nhkv->nhv", q.to(acc) * scale, state)
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + 1e-10)
    return o.to(q.dtype), state


def delta_rule_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    state: Tensor | None,
    g: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One decoding step of :func:`delta_rule`.

    ``q``, ``k`` ``[N, H, K]``, ``v`` ``[N, H, V]``, ``beta`` and ``g`` ``[N, H]``,
    ``state`` ``[N, H, K, V]`` (None: zeros). Returns ``(o [N, H, V], new_state)``
    as :func:`linear_attention_step` does; ``state`` is not modified.
    """
    scale = check_step(q, k, v, state, g=g, beta=beta, scale=scale, needs_beta=True)
    acc = accumulation_dtype(q.dtype)
    num, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    if state is None:
        state = torch.zeros(num, heads, dim_k, dim_v, dtype=acc, device=q.device)
    else:
        state = state.to(acc)
    if g is not None:
        state = state * g.to(acc).exp()[..., None, None]
    kf = k.to(acc)
    v_new = beta.to(acc)[..., None] * (v.to(acc) - torch.einsum("nhk,nhkv->nhv", kf, state))
    state = state + kf[..., :, None] * v_new[..., None, :]
    o = torch.einsum("nhk,nhkv->nhv", q.to(acc) * scale, state)
    return o.to(q.dtype), state


def linear_attention_from_scan(
    scan: LinearScan,
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
) -> tuple[Tensor, Tensor | None]:
    """Linear attention built on a causal ``scan``: validates the call
    (:func:`~tokenmix.linear_scan.args.check_linear_attention`), then normalizes the
    inputs for the scan (``g_gamma [H]`` becomes the view ``[B, T, H]``; gates and the
    initial state are cast to the accumulation dtype, ``cu_seqlens`` to int64), handles
    ``causal=False`` with plain matmuls and ``normalize=True`` with a second scan over
    ``v = 1`` (the decayed key sum).
    """
    scale, offsets = check_linear_attention(
        q,
        k,
        v,
        g=g,
        g_gamma=g_gamma,
        gk=gk,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        normalize=normalize,
        causal=causal,
    )
    acc = accumulation_dtype(q.dtype)
    if q.shape[0] == 0 or q.shape[1] == 0:  # no kernel call for empty inputs
        o, final = empty_result(q, v, initial_state, q.shape[0], normalize)
        return o, (final if output_final_state else None)
    h0 = None if initial_state is None else initial_state.to(acc)
    if not causal:
        if normalize:
            o_aug, final = bidirectional_linear_attention(
                q, k, _with_ones_column(v), scale, h0, offsets, False
            )
            return _normalized(o_aug, q.dtype), (final if output_final_state else None)
        o, final = bidirectional_linear_attention(q, k, v, scale, h0, offsets, False)
        return o, (final if output_final_state else None)
    batch, seq, heads = q.shape[:3]
    if g_gamma is not None:
        g = g_gamma.to(acc).view(1, 1, heads).expand(batch, seq, heads)
    elif g is not None:
        g = g.to(acc)
    if gk is not None:
        gk = gk.to(acc)
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int64)
    if normalize:
        # The normalizer (scale q_t) . (decayed sum of keys) is the same scan over
        # a value column of ones: append it, so the state carries the key sum as
        # its last column and decoding can resume from it.
        o_aug, final = scan(q, k, _with_ones_column(v), g, gk, h0, cu, scale)
        return _normalized(o_aug, q.dtype), (final if output_final_state else None)
    o, final = scan(q, k, v, g, gk, h0, cu, scale)
    return o, (final if output_final_state else None)


def _with_ones_column(v: Tensor) -> Tensor:
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _normalized(o_aug: Tensor, dtype: torch.dtype) -> Tensor:
    """Output of a scan over ``[v | 1]``: numerator / (denominator + 1e-10)."""
    acc = accumulation_dtype(dtype)
    o_aug = o_aug.to(acc)
    return (o_aug[..., :-1] / (o_aug[..., -1:] + 1e-10)).to(dtype)


def delta_rule_from_scan(
    scan: Callable[..., tuple[Tensor, Tensor]],
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
) -> tuple[Tensor, Tensor | None]:
    """The delta rule built on ``scan``: validates the call
    (:func:`~tokenmix.linear_scan.args.check_delta_rule`), casts ``beta``, ``g`` and the
    initial state to the accumulation dtype and ``cu_seqlens`` to int64, then runs it."""
    scale, _ = check_delta_rule(
        q,
        k,
        v,
        beta,
        g=g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
    acc = accumulation_dtype(q.dtype)
    if q.shape[0] == 0 or q.shape[1] == 0:  # no kernel call for empty inputs
        o, final = empty_result(q, v, initial_state, q.shape[0])
        return o, (final if output_final_state else None)
    o, final = scan(
        q,
        k,
        v,
        beta.to(acc),
        None if g is None else g.to(acc),
        None if initial_state is None else initial_state.to(acc),
        None if cu_seqlens is None else cu_seqlens.to(torch.int64),
        scale,
    )
    return o, (final if output_final_state else None)


def chunked_linear_attention(
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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    subchunk_size: int = DEFAULT_SUBCHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """Chunked linear attention; arguments and results as
    :func:`~tokenmix.linear_scan.linear_attention`, plus the chunk sizes
    (``subchunk_size`` is used with ``gk`` only; ``chunk_size`` must be a multiple of it).
    """
    check_chunk_sizes(chunk_size, subchunk_size, gk is not None)

    def scan(*args):
        return chunked_linear_scan(*args, chunk_size=chunk_size, subchunk_size=subchunk_size)

    return linear_attention_from_scan(
        scan,
        q,
        k,
        v,
        g=g,
        g_gamma=g_gamma,
        gk=gk,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        normalize=normalize,
        causal=causal,
    )


def chunked_delta_rule(
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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """Chunked (gated) delta rule; arguments and results as
    :func:`~tokenmix.linear_scan.delta_rule`, plus ``chunk_size``."""
    check_chunk_sizes(chunk_size, 1, False)

    def scan(*args):
        return chunked_delta_scan(*args, chunk_size=chunk_size)

    return delta_rule_from_scan(
        scan,
        q,
        k,
        v,
        beta,
        g=g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
