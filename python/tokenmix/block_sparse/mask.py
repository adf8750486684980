"""Element rules of partial blocks: the structured masks the kernels evaluate themselves.

An :class:`ElementMask` keeps element ``(b, q, k)`` of a partial block when every part it
has holds:

* **band**: ``lo <= k - q <= hi`` (inclusive), or ``k < prefix``. Causal attention with an
  offset is ``(-inf, offset]``; a sliding window of ``left`` keys before and ``right`` keys
  after the diagonal is ``[offset - left, offset + right]``; prefix-LM adds ``k < prefix``.
  With ``prefix_causal`` the prefix keys are attention sinks instead: ``k < prefix and
  k - q <= hi``, so a causal query never keeps a sink after it.
* **documents**: ``q_doc[b, q] == kv_doc[b, k]`` (packed sequences).

The same rule is available as a FlexAttention ``mask_mod`` (:meth:`ElementMask.mask_mod`), and
it is what ``csrc/include/tokenmix/block_sparse_problem.h`` (``ElementMask``) evaluates inside
the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import as_int

__all__ = ["UNBOUNDED", "ElementMask"]

# Band bounds this large mean "no bound" (they fit the kernels' int64 arithmetic with room).
UNBOUNDED = 1 << 62


def _doc_ids(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer document ids, got dtype {x.dtype}")
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"{name} must be [T] or [B, T], got shape {tuple(x.shape)}")
    if x.numel() > 0 and (int(x.min()) < -(2**31) or int(x.max()) >= 2**31):
        raise ValueError(f"{name} holds ids outside the int32 range")
    return x.to(torch.int32).contiguous()


@dataclass(frozen=True, eq=False)
class ElementMask:
    """A structured element rule for partial blocks (see the module docstring).

    Build one with :meth:`causal`, :meth:`sliding_window`, :meth:`prefix_lm` or
    :meth:`document`. ``band`` is ``(lo, hi)`` on ``k - q`` (inclusive; ``None`` for no band
    part); ``prefix`` keeps keys ``< prefix`` whatever the band's lower edge says, and its
    upper edge too unless ``prefix_causal`` (attention sinks: ``k < prefix and k - q <= hi``);
    ``q_doc`` / ``kv_doc`` are int32 ``[1 or B, T]`` document ids.
    """

    band: tuple[int, int] | None = None
    prefix: int = 0
    prefix_causal: bool = False
    q_doc: Tensor | None = None
    kv_doc: Tensor | None = None

    def __post_init__(self) -> None:
        if self.band is not None:
            lo, hi = (as_int(x, "band") for x in self.band)
            object.__setattr__(self, "band", (max(lo, -UNBOUNDED), min(hi, UNBOUNDED)))
        object.__setattr__(self, "prefix", as_int(self.prefix, "prefix"))
        if self.prefix < 0:
            raise ValueError(f"prefix must be >= 0, got {self.prefix}")
        if self.prefix > 0 and self.band is None:
            raise ValueError("prefix needs a band (prefix-LM is a band OR k < prefix)")
        if not isinstance(self.prefix_causal, bool):
            raise TypeError(
                f"prefix_causal must be a bool, got {type(self.prefix_causal).__name__}"
            )
        if (self.q_doc is None) != (self.kv_doc is None):
            raise ValueError("q_doc and kv_doc must be given together")
        if self.q_doc is not None:
            q_doc = _doc_ids(self.q_doc, "q_doc")
            kv_doc = _doc_ids(self.kv_doc, "kv_doc")
            if q_doc.shape[0] != kv_doc.shape[0]:
                raise ValueError(
                    f"q_doc and kv_doc must have the same batch size, got {q_doc.shape[0]} "
                    f"and {kv_doc.shape[0]}"
                )
            if q_doc.device != kv_doc.device:
                raise ValueError("q_doc and kv_doc must be on the same device")
            object.__setattr__(self, "q_doc", q_doc)
            object.__setattr__(self, "kv_doc", kv_doc)

    # ---- constructors ---------------------------------------------------------------------

    @classmethod
    def causal(cls, offset: int = 0) -> ElementMask:
        """Query ``q`` keeps keys ``k <= q + offset`` (offset ``Tk - Tq``: bottom-right)."""
        return cls(band=(-UNBOUNDED, as_int(offset, "offset")))

    @classmethod
    def sliding_window(cls, left: int, right: int = 0, offset: int = 0) -> ElementMask:
        """Query ``q`` keeps keys ``q + offset - left <= k <= q + offset + right``."""
        left, right, offset = as_int(left, "left"), as_int(right, "right"), as_int(offset, "offset")
        if left < 0 or right < 0:
            raise ValueError(f"left and right must be >= 0, got left={left}, right={right}")
        return cls(band=(offset - left, offset + right))

    @classmethod
    def prefix_lm(cls, prefix: int, offset: int = 0) -> ElementMask:
        """Causal (with ``offset``) plus every key ``< prefix`` (bidirectional prefix)."""
        return cls(band=(-UNBOUNDED, as_int(offset, "offset")), prefix=as_int(prefix, "prefix"))

    @classmethod
    def document(
        cls,
        q_doc: Tensor,
        kv_doc: Tensor | None = None,
        *,
        causal: bool = False,
        offset: int = 0,
    ) -> ElementMask:
        """Keys of the query's own document (``kv_doc`` defaults to ``q_doc``), optionally
        causal within it."""
        band = (-UNBOUNDED, as_int(offset, "offset")) if causal else None
        return cls(band=band, q_doc=q_doc, kv_doc=q_doc if kv_doc is None else kv_doc)

    # ---- evaluation ------------------------------------------------------------------------

    def check_lengths(self, q_len: int, kv_len: int, batch: int | None = None) -> None:
        """Document ids must cover the sequences (and the batch, unless broadcast)."""
        if self.q_doc is None:
            return
        if self.q_doc.shape[1] != q_len or self.kv_doc.shape[1] != kv_len:
            raise ValueError(
                f"document ids have lengths {self.q_doc.shape[1]} (q_doc) and "
                f"{self.kv_doc.shape[1]} (kv_doc), expected {q_len} and {kv_len}"
            )
        if batch is not None and self.q_doc.shape[0] not in (1, batch):
            raise ValueError(
                f"the element mask's document ids (q_doc, kv_doc) have batch size "
                f"{self.q_doc.shape[0]}, expected 1 or q's batch size {batch}"
            )

    def keeps(self, b: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """Bool tensor: whether ``(b, q, k)`` is kept (broadcasting int64 index tensors)."""
        keep = torch.ones((), dtype=torch.bool, device=q.device)
        if self.band is not None:
            d = k - q
            band = (d >= self.band[0]) & (d <= self.band[1])
            if self.prefix > 0:
                sink = k < self.prefix
                if self.prefix_causal:
                    sink = sink & (d <= self.band[1])
                band = band | sink
            keep = keep & band
        if self.q_doc is not None:
            q_doc = self.q_doc.to(q.device)
            kv_doc = self.kv_doc.to(q.device)
            bb = b if q_doc.shape[0] > 1 else torch.zeros_like(b)
            keep = keep & (q_doc[bb, q] == kv_doc[bb, k])
        return keep

    def mask_mod(self):
        """The same rule as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``."""
        rule = self

        def element_mask_mod(b, h, q_idx, kv_idx):
            return rule.keeps(b, q_idx, kv_idx)

        element_mask_mod._tokenmix_element_mask = rule  # type: ignore[attr-defined]
        return element_mask_mod

    def band_arg(self) -> list[int]:
        """The ``band`` argument of the ops: ``[]``, ``[lo, hi, prefix]``, or with a causal
        prefix ``[lo, hi, prefix, 1]``."""
        if self.band is None:
            return []
        causal = [1] if self.prefix_causal and self.prefix > 0 else []
        return [self.band[0], self.band[1], self.prefix, *causal]

    def to(self, device: torch.device | str) -> ElementMask:
        if self.q_doc is None or self.q_doc.device == torch.device(device):
            return self
        return ElementMask(
            band=self.band,
            prefix=self.prefix,
            prefix_causal=self.prefix_causal,
            q_doc=self.q_doc.to(device),
            kv_doc=self.kv_doc.to(device),
        )
