"""nn.Module layers of the FFT-mixing family, channels last.

* :class:`HyenaFilter`: Hyena's implicit long filter (an FFN of a positional encoding times
  an exponential decay window).
* :class:`HyenaOperator`: the Hyena operator (Poli et al., 2023): projections, a short
  depthwise causal convolution, then ``order`` rounds of long convolution
  (:func:`~tokenmix.fft_conv`) and elementwise gating.
* :class:`FNetMixing`: FNet's parameter-free Fourier mixing (:func:`~tokenmix.fourier_mix`).
* :class:`GlobalFilter2D`: GFNet's learned global filter (:func:`~tokenmix.global_filter`).
* :class:`SpectralGate`: FFTNet-style adaptive spectral filtering
  (:func:`~tokenmix.spectral_gate`).

Every constructor and ``forward`` raises ``ValueError`` (``TypeError`` for a wrong Python
type) naming the offending argument.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import as_int, require_bool
from .._utils import accumulation_dtype
from .functional import fft_conv, fourier_mix, global_filter, spectral_gate

__all__ = ["FNetMixing", "GlobalFilter2D", "HyenaFilter", "HyenaOperator", "SpectralGate"]


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------


def _int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as a Python int ``>= minimum``; bools and non-integers are a ``TypeError``."""
    value = as_int(value, name)
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _float(value: Any, name: str, *, positive: bool = False) -> float:
    """``value`` as a finite Python float (``> 0`` with ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _activation(value: Any) -> str | None:
    if value is not None and value != "modrelu":
        raise ValueError(f"activation must be None or 'modrelu', got {value!r}")
    return value


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _check_tokens(module: nn.Module, x: Any, channels: int, max_length: int | None) -> Tensor:
    """``x`` is a ``[B, L, channels]`` tensor with ``1 <= L (<= max_length)``."""
    name = type(module).__name__
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor for {name}, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != channels:
        raise ValueError(
            f"x must be [B, L, {channels}] (tokens before channels) for {name}, got shape "
            f"{_shape(x)}"
        )
    if x.shape[1] < 1:
        raise ValueError(f"x must have at least one token for {name}, got shape {_shape(x)}")
    if max_length is not None and x.shape[1] > max_length:
        raise ValueError(
            f"x has L = {x.shape[1]} tokens but {name} was built for max_length = {max_length}"
        )
    return x


# ---------------------------------------------------------------------------------------
# Hyena
# ---------------------------------------------------------------------------------------


class _Sin(nn.Module):
    """``sin(freq * x)`` with a learnable frequency per feature (Hyena's filter activation)."""

    def __init__(self, dim: int, w: float) -> None:
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), float(w)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.freq * x)

    def extra_repr(self) -> str:
        return f"dim={self.freq.numel()}"


class HyenaFilter(nn.Module):
    """Hyena's implicit long filter: ``k[c, t] = FFN(z_t)[c] * window[c, t]``.

    For positions ``p = 0 .. max_length - 1`` and ``t_p = p / (max_length - 1)`` (in
    ``[0, 1]``; 0 when ``max_length == 1``):

    * positional encoding ``z_p = [t_p, cos(2 pi f p / max_length), -sin(2 pi f p /
      max_length)]`` for the ``bands = (emb_dim - 1) // 2`` frequencies ``f = 0 .. bands - 1``
      (the real and imaginary parts of ``exp(-i 2 pi f p / max_length)``, as in the Hyena
      paper; ``emb_dim`` must be odd and ``>= 3``);
    * ``FFN = Linear(emb_dim, order) -> Sin -> Linear(order, order) -> Sin ->
      Linear(order, channels, bias=False)``, each ``Sin`` being ``sin(freq * x)`` with its
      own learnable frequency per unit, initialised to ``w``;
    * decay window (``modulate=True``) ``exp(-t_p * |delta_c|) + shift`` with ``delta_c``
      spaced linearly over the channels from ``log(target) / slow_decay_pct`` (channel 0,
      slowest) to ``log(target) / fast_decay_pct`` (last channel, fastest): channel ``c``'s
      window falls to ``target`` at ``t = log(target) / delta_c``, i.e. at the fraction
      ``slow_decay_pct`` (resp. ``fast_decay_pct``) of ``max_length`` for the extreme
      channels. ``modulate=False`` leaves the FFN output unwindowed (no ``shift`` either).

    ``forward(length)`` returns the first ``length`` taps, ``[channels, length]``: a shorter
    filter is a prefix of the ``max_length`` one. The encoding and the window are computed
    on the fly (in float32, float64 for a float64 filter), so they are not in the state
    dict.

    Example::

        >>> import torch, tokenmix
        >>> filt = tokenmix.nn.HyenaFilter(64, 1024)
        >>> filt(1000).shape
        torch.Size([64, 1000])
    """

    def __init__(
        self,
        channels: int,
        max_length: int,
        *,
        order: int = 64,
        emb_dim: int = 3,
        w: float = 1.0,
        fast_decay_pct: float = 0.3,
        slow_decay_pct: float = 1.5,
        target: float = 1e-2,
        modulate: bool = True,
        shift: float = 0.0,
    ) -> None:
        super().__init__()
        self.channels = _int(channels, "channels")
        self.max_length = _int(max_length, "max_length")
        self.order = _int(order, "order")
        self.emb_dim = _int(emb_dim, "emb_dim", minimum=3)
        if self.emb_dim % 2 != 1:
            raise ValueError(
                f"emb_dim must be odd (1 + 2 * bands: t plus the real and imaginary parts of "
                f"each band), got {self.emb_dim}"
            )
        w = _float(w, "w")
        self.fast_decay_pct = _float(fast_decay_pct, "fast_decay_pct", positive=True)
        self.slow_decay_pct = _float(slow_decay_pct, "slow_decay_pct", positive=True)
        self.target = _float(target, "target", positive=True)
        if self.target >= 1.0:
            raise ValueError(f"target must be in (0, 1) (the decayed value), got {target}")
        self.modulate = require_bool(modulate, "modulate")
        self.shift = _float(shift, "shift")
        self.bands = (self.emb_dim - 1) // 2
        self.mlp = nn.Sequential(
            nn.Linear(self.emb_dim, self.order),
            _Sin(self.order, w),
            nn.Linear(self.order, self.order),
            _Sin(self.order, w),
            nn.Linear(self.order, self.channels, bias=False),
        )

    def _check_length(self, length: Any) -> int:
        length = _int(length, "length")
        if length > self.max_length:
            raise ValueError(f"length must be <= max_length = {self.max_length}, got {length}")
        return length

    def _factory(self) -> dict[str, Any]:
        weight = self.mlp[0].weight
        return {"dtype": accumulation_dtype(weight.dtype), "device": weight.device}

    def positional_encoding(self, length: int) -> tuple[Tensor, Tensor]:
        """``(t [length], z [length, emb_dim])`` for the first ``length`` positions, in
        float32 (float64 for a float64 filter)."""
        length = self._check_length(length)
        kw = self._factory()
        pos = torch.arange(length, **kw)
        t = pos / max(self.max_length - 1, 1)
        freqs = torch.arange(self.bands, **kw)
        angle = (2 * math.pi / self.max_length) * pos[:, None] * freqs
        return t, torch.cat([t[:, None], torch.cos(angle), -torch.sin(angle)], dim=1)

    def decay_window(self, length: int) -> Tensor:
        """The ``[channels, length]`` window ``exp(-t * |delta_c|) + shift`` (float32, float64
        for a float64 filter)."""
        t, _ = self.positional_encoding(length)
        log_target = math.log(self.target)
        deltas = torch.linspace(
            log_target / self.slow_decay_pct,
            log_target / self.fast_decay_pct,
            self.channels,
            **self._factory(),
        )
        return torch.exp(-deltas.abs()[:, None] * t) + self.shift

    def forward(self, length: int) -> Tensor:
        """The filter's first ``length`` taps, ``[channels, length]``, in the filter's dtype."""
        _, z = self.positional_encoding(length)
        k = self.mlp(z.to(self.mlp[0].weight.dtype)).transpose(0, 1)
        if self.modulate:
            k = k * self.decay_window(length).to(k.dtype)
        return k

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, max_length={self.max_length}, order={self.order}, "
            f"emb_dim={self.emb_dim}, modulate={self.modulate}"
        )


class HyenaOperator(nn.Module):
    """The Hyena operator of order ``N = order`` (Poli et al., 2023), channels last.

    ``in_proj`` (``Linear(d_model, (N + 1) d_model)``), then a depthwise causal convolution
    of ``short_filter_order`` taps over the tokens, split into the value ``v = x_0`` and the
    gates ``x_1 .. x_N`` (``d_model`` channels each, in that order). Then for ``i = 1 .. N``::

        v = x_i * (h_i conv v + D_i * v)

    with ``h_i`` the ``i``-th block of ``d_model`` channels of one
    :class:`HyenaFilter` ``(N * d_model, max_length)`` and ``D_i`` a learnable skip weight
    per channel (``self.D``, ``[N, d_model]``, initialised from a standard normal as in the
    reference implementation). The skip is folded into the filter's first tap
    (``h_i[:, 0] + D_i`` is ``h_i + D_i delta``), so each round is one fused
    :func:`~tokenmix.fft_conv` call with the gate as ``post_gate``. ``dropout`` is applied
    to ``v`` before each long convolution. Finally ``out_proj``
    (``Linear(d_model, d_model)``).

    ``causal=False`` makes the long convolutions circular (length ``L``); the short
    convolution stays causal. Input and output: ``[B, L, d_model]`` with
    ``L <= max_length``.

    Example::

        >>> import torch, tokenmix
        >>> hyena = tokenmix.nn.HyenaOperator(64, 1024)
        >>> hyena(torch.randn(2, 1000, 64)).shape
        torch.Size([2, 1000, 64])
    """

    def __init__(
        self,
        d_model: int,
        max_length: int,
        *,
        order: int = 2,
        filter_order: int = 64,
        dropout: float = 0.0,
        short_filter_order: int = 3,
        causal: bool = True,
    ) -> None:
        super().__init__()
        self.d_model = _int(d_model, "d_model")
        self.max_length = _int(max_length, "max_length")
        self.order = _int(order, "order")
        filter_order = _int(filter_order, "filter_order")
        dropout = _float(dropout, "dropout")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.short_filter_order = _int(short_filter_order, "short_filter_order")
        self.causal = require_bool(causal, "causal")
        inner = (self.order + 1) * self.d_model
        self.in_proj = nn.Linear(self.d_model, inner)
        self.short_filter = nn.Conv1d(
            inner,
            inner,
            self.short_filter_order,
            groups=inner,
            padding=self.short_filter_order - 1,
        )
        self.filter = HyenaFilter(self.d_model * self.order, self.max_length, order=filter_order)
        self.D = nn.Parameter(torch.randn(self.order, self.d_model))
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(self.d_model, self.d_model)

    def filters(self, length: int) -> Tensor:
        """The long filters with the skips folded in, ``[order, d_model, length]``:
        ``h_i + D_i delta``."""
        k = self.filter(length).reshape(self.order, self.d_model, length)
        return torch.cat([k[..., :1] + self.D[..., None].to(k.dtype), k[..., 1:]], dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, L, d_model]`` -> ``[B, L, d_model]``."""
        x = _check_tokens(self, x, self.d_model, self.max_length)
        length = x.shape[1]
        u = self.in_proj(x).transpose(1, 2)  # [B, (N + 1) d_model, L]
        u = self.short_filter(u)[..., :length].transpose(1, 2)  # causal: the first L outputs
        v, *gates = u.split(self.d_model, dim=-1)
        k = self.filters(length)
        for i, gate in enumerate(gates):
            v = fft_conv(self.dropout(v), k[i], causal=self.causal, post_gate=gate)
        return self.out_proj(v)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, max_length={self.max_length}, order={self.order}, "
            f"short_filter_order={self.short_filter_order}, causal={self.causal}"
        )


# ---------------------------------------------------------------------------------------
# FNet, GFNet, FFTNet
# ---------------------------------------------------------------------------------------


class FNetMixing(nn.Module):
    """FNet's token mixing ``Re(FFT_tokens(FFT_channels(x)))`` of ``x`` ``[B, L, C]``
    (:func:`~tokenmix.fourier_mix`). No parameters.

    Example::

        >>> import torch, tokenmix
        >>> tokenmix.nn.FNetMixing()(torch.randn(2, 128, 64)).shape
        torch.Size([2, 128, 64])
    """

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, L, C]`` -> ``[B, L, C]``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor for FNetMixing, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[1] < 1 or x.shape[2] < 1:
            raise ValueError(
                f"x must be [B, L, C] (tokens before channels) for FNetMixing, got shape "
                f"{_shape(x)}"
            )
        return fourier_mix(x)


class GlobalFilter2D(nn.Module):
    """GFNet's global filter layer: ``irfft2(rfft2(x) * W)`` over an ``[height, width]`` token
    grid, orthonormal both ways (:func:`~tokenmix.global_filter`).

    ``W`` is a learned complex ``[height, width // 2 + 1, channels]`` filter, stored as the
    real parameter ``weight`` ``[height, width // 2 + 1, channels, 2]`` initialised from
    ``N(0, 0.02^2)`` as in GFNet.

    ``forward`` takes ``x`` ``[B, height, width, channels]``, or ``[B, N, channels]`` with
    ``N = height * width`` tokens in row-major order (returned as ``[B, N, channels]``).

    Example::

        >>> import torch, tokenmix
        >>> gf = tokenmix.nn.GlobalFilter2D(14, 14, 96)
        >>> gf(torch.randn(2, 14, 14, 96)).shape
        torch.Size([2, 14, 14, 96])
        >>> gf(torch.randn(2, 196, 96)).shape
        torch.Size([2, 196, 96])
    """

    def __init__(self, height: int, width: int, channels: int) -> None:
        super().__init__()
        self.height = _int(height, "height")
        self.width = _int(width, "width")
        self.channels = _int(channels, "channels")
        self.weight = nn.Parameter(
            torch.randn(self.height, self.width // 2 + 1, self.channels, 2) * 0.02
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, height, width, channels]`` or ``[B, height * width, channels]`` -> the
        same shape."""
        h, w, c = self.height, self.width, self.channels
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor for GlobalFilter2D, got {type(x).__name__}")
        if x.dim() == 3 and tuple(x.shape[1:]) == (h * w, c):
            batch = x.shape[0]
            return global_filter(x.reshape(batch, h, w, c), self.weight).reshape(batch, h * w, c)
        if x.dim() == 4 and tuple(x.shape[1:]) == (h, w, c):
            return global_filter(x, self.weight)
        raise ValueError(
            f"x must be [B, {h}, {w}, {c}] or [B, {h * w}, {c}] (height * width tokens) for "
            f"GlobalFilter2D, got shape {_shape(x)}"
        )

    def extra_repr(self) -> str:
        return f"height={self.height}, width={self.width}, channels={self.channels}"


class SpectralGate(nn.Module):
    """FFTNet-style adaptive spectral filtering (:func:`~tokenmix.spectral_gate`).

    Per head, the tokens' ``rfft`` is multiplied by the complex gate::

        gate[b, h, f] = base_filter[h, f] + MLP(mean_t x[b, t, :])[h, f]

    then passes through modReLU ``relu(|z| + bias[h, f]) * z / |z|`` (``activation=
    "modrelu"``; none with ``activation=None``), and ``irfft``. Parameters, for
    ``F_max = max_length // 2 + 1`` bins:

    * ``base_filter``: the complex ``[heads, F_max]`` base filter as a real
      ``[heads, F_max, 2]`` parameter, initialised to ``1 + 0i``;
    * ``mlp``: ``Linear(dim, hidden) -> GELU -> Linear(hidden, heads * F_max * 2)`` with
      ``hidden = max(dim // 4, 4)``, applied to the mean token; its output, read as
      ``[heads, F_max, 2]`` (real, imaginary), is the input-dependent modulation. Its last
      layer is initialised to zero, so a fresh layer is the identity;
    * ``bias``: modReLU's ``[heads, F_max]`` bias, initialised to zero (``None`` with
      ``activation=None``).

    A sequence of ``L <= max_length`` tokens has ``F = L // 2 + 1`` bins and uses the first
    ``F`` entries of ``base_filter``, of the modulation and of ``bias``: entry ``f`` always
    multiplies the ``f``-th rfft bin of the sequence at hand (``f / L`` cycles per token).

    Example::

        >>> import torch, tokenmix
        >>> sg = tokenmix.nn.SpectralGate(64, 4, 256)
        >>> x = torch.randn(2, 256, 64)
        >>> torch.allclose(sg(x), x, atol=1e-5)  # identity at initialisation
        True
        >>> sg(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    def __init__(
        self, dim: int, heads: int, max_length: int, *, activation: str | None = "modrelu"
    ) -> None:
        super().__init__()
        self.dim = _int(dim, "dim")
        self.heads = _int(heads, "heads")
        if self.dim % self.heads != 0:
            raise ValueError(f"heads must divide dim = {self.dim}, got heads = {self.heads}")
        self.max_length = _int(max_length, "max_length")
        self.activation = _activation(activation)
        self.bins = self.max_length // 2 + 1
        self.hidden = max(self.dim // 4, 4)
        base = torch.zeros(self.heads, self.bins, 2)
        base[..., 0] = 1.0
        self.base_filter = nn.Parameter(base)
        self.mlp = nn.Sequential(
            nn.Linear(self.dim, self.hidden),
            nn.GELU(),
            nn.Linear(self.hidden, self.heads * self.bins * 2),
        )
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        if self.activation == "modrelu":
            self.bias = nn.Parameter(torch.zeros(self.heads, self.bins))
        else:
            self.register_parameter("bias", None)

    def gate(self, x: Tensor) -> Tensor:
        """The real ``[B, heads, L // 2 + 1, 2]`` gate for ``x`` ``[B, L, dim]``."""
        x = _check_tokens(self, x, self.dim, self.max_length)
        bins = x.shape[1] // 2 + 1
        modulation = self.mlp(x.mean(dim=1)).reshape(-1, self.heads, self.bins, 2)
        return self.base_filter[:, :bins] + modulation[:, :, :bins]

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, L, dim]`` (``L <= max_length``) -> ``[B, L, dim]``."""
        gate = self.gate(x)
        bias = None if self.bias is None else self.bias[:, : gate.shape[2]]
        return spectral_gate(x, gate, heads=self.heads, activation=self.activation, bias=bias)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, max_length={self.max_length}, "
            f"activation={self.activation!r}"
        )
