"""nn.Module layers: linear attention (plain / RetNet / simple GLA / GLA) and Gated DeltaNet.

Both layers take ``x`` ``[B, T, dim]`` and return ``(y, state)``:
``forward(x, state=None, output_final_state=False, cu_seqlens=None)``. ``state``
(``[N, H, K, V]``) continues a previous call, so a sequence can be processed as a
prefill followed by one-token decoding steps; a one-token call runs the cheap
single-step update.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._context_parallel import is_sharded, pick_operator
from .._utils import accumulation_dtype
from .functional import delta_rule, delta_rule_step, linear_attention, linear_attention_step

__all__ = ["GatedDeltaNet", "LinearAttention"]

_FEATURE_MAPS = ("identity", "elu+1", "relu")
_DECAYS = (None, "fixed", "scalar", "gated")


def _check_dims(dim: int, num_heads: int) -> None:
    for name, value in (("dim", dim), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_input(module: nn.Module, x: Tensor, dim: int, cu_seqlens: Tensor | None) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{type(module).__name__} expects x of shape [B, T, {dim}], got {shape}")
    if cu_seqlens is not None and x.shape[0] != 1:
        raise ValueError(
            f"with cu_seqlens x must have batch size 1 (packed sequences), got {x.shape[0]}"
        )


def retnet_log_decays(num_heads: int) -> Tensor:
    """RetNet's fixed per-head log decays ``log(1 - 2 ** (-5 - h))``, ``h = 0..H-1``."""
    h = torch.arange(num_heads, dtype=torch.float64)
    return torch.log1p(-torch.pow(2.0, -5.0 - h)).to(torch.float32)


class LinearAttention(nn.Module):
    """Multi-head linear attention with an optional decay.

    ``q, k, v = proj(x)``, a feature map on ``q`` and ``k``, then
    :func:`~tokenmix.linear_scan.linear_attention` per head (``K = V = dim //
    num_heads``) and an output projection.

    Args:
        dim: model width; must be a multiple of ``num_heads``.
        num_heads: number of heads.
        feature_map: ``"identity"``, ``"elu+1"`` (``elu(x) + 1``, positive, the usual
            choice with ``normalize``) or ``"relu"``, applied to q and k.
        decay: ``None`` (plain linear attention); ``"fixed"``: RetNet's per-head
            decays ``log(1 - 2**(-5-h))`` (a buffer, not learned); ``"scalar"``: one
            data-dependent log decay per head and token (simple GLA / Mamba2-like),
            ``logsigmoid(Linear(x)) / gate_logit_normalizer``; ``"gated"``: per-key
            log gates (GLA), ``logsigmoid(low-rank Linear(x)) / gate_logit_normalizer``.
        normalize: divide by the (decayed) key-sum normalizer (see
            :func:`~tokenmix.linear_scan.linear_attention`); cannot continue from a
            state, so no decoding with it.
        causal: ``False`` makes the layer bidirectional (only without decay).
        qkv_bias, proj_bias: biases of the input and output projections.
        gate_low_rank_dim: rank of the ``"gated"`` gate projection.
        gate_logit_normalizer: divides the log gates (GLA's temperature, 16).
        scale: query scale, default ``head_dim ** -0.5``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        feature_map: str = "identity",
        decay: str | None = None,
        normalize: bool = False,
        causal: bool = True,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        _check_dims(dim, num_heads)
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads})")
        if feature_map not in _FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {_FEATURE_MAPS}, got {feature_map!r}")
        if decay not in _DECAYS:
            raise ValueError(f"decay must be one of {_DECAYS}, got {decay!r}")
        if not causal and decay is not None:
            raise ValueError(
                "causal=False (bidirectional) is only defined for undecayed linear attention; "
                f"got decay={decay!r}"
            )
        if gate_logit_normalizer <= 0:
            raise ValueError(f"gate_logit_normalizer must be > 0, got {gate_logit_normalizer}")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.feature_map, self.decay = feature_map, decay
        self.normalize, self.causal = normalize, causal
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        self.scale = scale
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.g_proj: nn.Module | None = None
        if decay == "fixed":
            self.register_buffer("g_gamma", retnet_log_decays(num_heads))
        else:
            self.register_buffer("g_gamma", None)
        if decay == "scalar":
            self.g_proj = nn.Linear(dim, num_heads)
        elif decay == "gated":
            self.g_proj = nn.Sequential(
                nn.Linear(dim, gate_low_rank_dim, bias=False),
                nn.Linear(gate_low_rank_dim, dim, bias=True),
            )

    def _features(self, x: Tensor) -> Tensor:
        if self.feature_map == "elu+1":
            return F.elu(x) + 1.0
        if self.feature_map == "relu":
            return F.relu(x)
        return x

    def forward(
        self,
        x: Tensor,
        state: Tensor | None = None,
        output_final_state: bool = False,
        cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``x`` ``[B, T, dim]`` -> ``(y [B, T, dim], final state [N, H, K, K] or None)``."""
        _check_input(self, x, self.dim, cu_seqlens)
        batch, seq = x.shape[:2]
        h, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).unflatten(-1, (3, h, d)).unbind(2)
        q, k = self._features(q), self._features(k)
        # Gates in the accumulation dtype (float32 for low-precision models).
        acc = accumulation_dtype(q.dtype)
        g = gk = None
        if self.decay == "scalar":
            g = F.logsigmoid(self.g_proj(x).to(acc)) / self.gate_logit_normalizer
        elif self.decay == "gated":
            gk = F.logsigmoid(self.g_proj(x).to(acc)) / self.gate_logit_normalizer
            gk = gk.unflatten(-1, (h, d))
        g_gamma = None if self.g_gamma is None else self.g_gamma.to(acc)
        if seq == 1 and cu_seqlens is None and self.causal and not is_sharded(self):
            o, new_state = linear_attention_step(
                q[:, 0],
                k[:, 0],
                v[:, 0],
                state,
                g=None if g is None else g[:, 0],
                g_gamma=g_gamma,
                gk=None if gk is None else gk[:, 0],
                scale=self.scale,
                normalize=self.normalize,
            )
            o = o[:, None]
            new_state = new_state if output_final_state else None
        else:
            o, new_state = pick_operator(self, linear_attention, "linear_attention")(
                q,
                k,
                v,
                g=g,
                g_gamma=g_gamma,
                gk=gk,
                scale=self.scale,
                initial_state=state,
                output_final_state=output_final_state,
                cu_seqlens=cu_seqlens,
                normalize=self.normalize,
                causal=self.causal,
            )
        return self.proj(o.reshape(batch, seq, self.dim)), new_state

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, feature_map={self.feature_map!r}, "
            f"decay={self.decay!r}, normalize={self.normalize}, causal={self.causal}"
        )


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet layer (Yang et al., 2024), without the short convolutions.

    ``q = l2norm(silu(W_q x))``, ``k = l2norm(silu(W_k x))``, ``v = silu(W_v x)``,
    ``beta = sigmoid(W_b x)`` and the Mamba2-style log decay
    ``g = -exp(A_log) * softplus(W_a x + dt_bias)`` per head, then the gated delta
    rule (:func:`~tokenmix.linear_scan.delta_rule`), a per-head RMSNorm (gated by
    ``silu(W_g x)`` when ``use_gate``) and an output projection.

    Args:
        dim: model width.
        num_heads: number of heads.
        head_dim: q/k head dim, default ``dim // num_heads``.
        expand_v: v head dim = ``int(head_dim * expand_v)``.
        use_gate: output gate ``silu(W_g x)`` on the normalized heads.
        norm_eps: RMSNorm epsilon.
        allow_neg_eigval: ``beta = 2 * sigmoid(.)`` (eigenvalues of the transition in
            ``[-1, 1]``).
        scale: query scale, default ``head_dim ** -0.5``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        expand_v: float = 1.0,
        use_gate: bool = True,
        norm_eps: float = 1e-5,
        allow_neg_eigval: bool = False,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        _check_dims(dim, num_heads)
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(
                    f"dim ({dim}) must be a multiple of num_heads ({num_heads}) when "
                    "head_dim is not given"
                )
            head_dim = dim // num_heads
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        head_v_dim = int(head_dim * expand_v)
        if head_v_dim < 1 or not math.isclose(head_v_dim, head_dim * expand_v):
            raise ValueError(
                f"expand_v ({expand_v}) * head_dim ({head_dim}) must be a positive integer"
            )
        self.dim, self.num_heads = dim, num_heads
        self.head_dim, self.head_v_dim = head_dim, head_v_dim
        self.use_gate, self.allow_neg_eigval = use_gate, allow_neg_eigval
        self.norm_eps = norm_eps
        self.scale = scale
        key_dim, value_dim = num_heads * head_dim, num_heads * head_v_dim
        self.q_proj = nn.Linear(dim, key_dim, bias=False)
        self.k_proj = nn.Linear(dim, key_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.a_proj = nn.Linear(dim, num_heads, bias=False)
        self.b_proj = nn.Linear(dim, num_heads, bias=False)
        self.g_proj = nn.Linear(dim, value_dim, bias=False) if use_gate else None
        self.o_norm_weight = nn.Parameter(torch.ones(head_v_dim))
        self.o_proj = nn.Linear(value_dim, dim, bias=False)
        # Mamba2's initialization: A in [1, 16], dt log-uniform in [1e-3, 0.1].
        self.A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(1.0, 16.0)))
        dt = torch.exp(
            torch.rand(num_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)
        ).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def forward(
        self,
        x: Tensor,
        state: Tensor | None = None,
        output_final_state: bool = False,
        cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``x`` ``[B, T, dim]`` -> ``(y [B, T, dim], final state [N, H, K, V] or None)``."""
        _check_input(self, x, self.dim, cu_seqlens)
        batch, seq = x.shape[:2]
        h = self.num_heads
        q = F.normalize(F.silu(self.q_proj(x)).unflatten(-1, (h, self.head_dim)), dim=-1)
        k = F.normalize(F.silu(self.k_proj(x)).unflatten(-1, (h, self.head_dim)), dim=-1)
        v = F.silu(self.v_proj(x)).unflatten(-1, (h, self.head_v_dim))
        # beta and g in the accumulation dtype (float32 for low-precision models).
        acc = accumulation_dtype(q.dtype)
        beta = torch.sigmoid(self.b_proj(x).to(acc))
        if self.allow_neg_eigval:
            beta = beta * 2.0
        a = self.a_proj(x).to(acc) + self.dt_bias.to(acc)
        g = -self.A_log.to(acc).exp() * F.softplus(a)
        if seq == 1 and cu_seqlens is None and not is_sharded(self):
            o, new_state = delta_rule_step(
                q[:, 0], k[:, 0], v[:, 0], beta[:, 0], state, g=g[:, 0], scale=self.scale
            )
            o = o[:, None]
            new_state = new_state if output_final_state else None
        else:
            o, new_state = pick_operator(self, delta_rule, "delta_rule")(
                q,
                k,
                v,
                beta,
                g=g,
                scale=self.scale,
                initial_state=state,
                output_final_state=output_final_state,
                cu_seqlens=cu_seqlens,
            )
        # Per-head RMSNorm (in float32, float64 for float64 inputs), optionally gated.
        acc = accumulation_dtype(o.dtype)
        of = o.to(acc)
        of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        of = of * self.o_norm_weight.to(acc)
        if self.g_proj is not None:
            gate = self.g_proj(x).unflatten(-1, (h, self.head_v_dim))
            of = of * F.silu(gate.to(acc))
        o = of.to(x.dtype).reshape(batch, seq, h * self.head_v_dim)
        return self.o_proj(o), new_state

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"head_v_dim={self.head_v_dim}, use_gate={self.use_gate}"
        )
