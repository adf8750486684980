"""Drop-in call sites for code written against other kernel libraries.

``from tokenmix.compat import natten`` and ``from tokenmix.compat import fla`` give the
functions of NATTEN 0.21 and flash-linear-attention 0.6 with their signatures, defaults
and return conventions, computed by tokenmix's kernels (docs/compat.md).
"""

from __future__ import annotations

__all__ = ["fla", "natten"]
