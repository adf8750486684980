"""Draw the masks of docs/patterns.md (docs/images/pattern_*.png).

Run from the repository root with matplotlib installed (an optional dependency, for pictures
only):

    PYTHONPATH=python python docs/images/make_pattern_images.py

Each picture is the token x token mask of a small layout (queries down, keys across), coloured
by how the layout represents it: dark blue = full blocks (no mask work), mid blue = kept
elements of partial blocks, light grey = dropped elements of partial blocks (computed and
masked), white = skipped blocks. Thin lines mark the blocks.
"""

from __future__ import annotations

import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))
from tokenmix import patterns  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent
COLOURS = ["#ffffff", "#dcdcdc", "#5b9bd5", "#1f3f73"]
LEGEND = [
    Patch(color=COLOURS[3], label="full block"),
    Patch(color=COLOURS[2], label="partial block: kept"),
    Patch(color=COLOURS[1], label="partial block: dropped"),
    Patch(facecolor=COLOURS[0], edgecolor="#999999", label="skipped block"),
]


def picture(layout, head: int = 0) -> torch.Tensor:
    """0 skipped, 1 dropped in a partial block, 2 kept in a partial block, 3 full block."""
    keep = layout.dense_mask()[0, head]
    status = layout.block_status()[0, min(head, layout.heads - 1)].long()
    qb, kb = layout.block_size
    q = torch.arange(layout.q_len) // qb
    k = torch.arange(layout.kv_len) // kb
    st = status[q][:, k]
    return torch.where(st == 2, 3, torch.where(st == 1, 1 + keep.long(), 0))


def draw(ax, layout, title: str, head: int = 0) -> None:
    img = picture(layout, head)
    ax.imshow(img.numpy(), cmap=ListedColormap(COLOURS), vmin=0, vmax=3, interpolation="nearest")
    qb, kb = layout.block_size
    for x in range(kb, layout.kv_len, kb):
        ax.axvline(x - 0.5, color="#bbbbbb", lw=0.3)
    for y in range(qb, layout.q_len, qb):
        ax.axhline(y - 0.5, color="#bbbbbb", lw=0.3)
    rule = "structured" if layout.element_mask is not None else "bitmask"
    if not layout.kv_num_blocks.any():
        rule = "full blocks only"
    ax.set_title(f"{title}\n({rule})", fontsize=9)
    ax.set_xlabel("key", fontsize=8)
    ax.set_ylabel("query", fontsize=8)
    ax.tick_params(labelsize=7)


def save(fig, name: str, ncol: int = 4) -> None:
    fig.legend(handles=LEGEND, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1 if ncol < 4 else 0.07, 1, 1))
    path = OUT / f"pattern_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(path.relative_to(ROOT))


def panels(items, name: str, width: float = 3.6) -> None:
    fig, axes = plt.subplots(1, len(items), figsize=(width * len(items), width + 0.9))
    axes = [axes] if len(items) == 1 else list(axes)
    for ax, (layout, title, head) in zip(axes, items, strict=True):
        draw(ax, layout, title, head)
    save(fig, name, ncol=4 if len(items) > 1 else 2)


def main() -> None:
    T, bs = 256, 32
    panels(
        [
            (patterns.sliding_window(T, 64, block_size=bs), "sliding_window(window=64)", 0),
            (
                patterns.sliding_window(T, 64, sinks=8, block_size=bs),
                "sliding_window(window=64, sinks=8)",
                0,
            ),
            (
                patterns.sliding_window(T, 40, causal=False, sinks=8, block_size=bs),
                "sliding_window(window=40, causal=False, sinks=8)",
                0,
            ),
        ],
        "sliding_window",
    )
    windows = [16, 48, 96, 256]
    per_head = patterns.per_head_windows(T, windows, sinks=4, block_size=bs)
    panels(
        [(per_head, f"head {h}: window={w}, sinks=4", h) for h, w in enumerate(windows)],
        "per_head_windows",
        width=3.0,
    )
    alpha, beta = [16.0, -64.0, 0.0], [0.0, 0.5, 0.25]
    items = []
    for length in (128, 256):
        sizes = patterns.elastic_window_sizes(length, alpha, beta)
        layout = patterns.elastic_windows(length, alpha, beta, sinks=4, block_size=bs // 2)
        items += [(layout, f"T={length}, head {h}: window={sizes[h]}", h) for h in (0, 1, 2)]
    fig, axes = plt.subplots(2, 3, figsize=(10.5, 7.8))
    for ax, (layout, title, head) in zip(axes.flatten(), items, strict=True):
        draw(ax, layout, title, head)
    save(fig, "elastic_windows")
    panels(
        [
            (patterns.dilated(T, 8, 4, block_size=bs), "dilated(window=8, dilation=4)", 0),
            (
                patterns.dilated(T, 6, 8, causal=False, block_size=bs),
                "dilated(window=6, dilation=8, causal=False)",
                0,
            ),
        ],
        "dilated",
    )
    panels(
        [
            (
                patterns.power_attention(512, 2, block_size=16),
                "power_attention(window=2 blocks)",
                0,
            ),
            (
                patterns.power_attention(T, 4, granularity="token", block_size=bs),
                "power_attention(window=4, 'token')",
                0,
            ),
        ],
        "power_attention",
        width=4.2,
    )
    panels(
        [
            (
                patterns.radial(12, 48, threshold=4, block_size=16),
                "radial(12 frames x 48 tokens, threshold=4)",
                0,
            ),
            (
                patterns.radial(12, 48, sinks=1, model_type="wan", threshold=4, block_size=16),
                "radial(..., sinks=1, model_type='wan')",
                0,
            ),
        ],
        "radial",
        width=5.0,
    )
    cu = [0, 70, 150, 160, 256]
    panels(
        [
            (patterns.document(cu, block_size=bs), "document(cu_seqlens)", 0),
            (patterns.document(cu, causal=True, block_size=bs), "document(causal=True)", 0),
            (
                patterns.document(cu, causal=True, window=24, T=280, block_size=bs),
                "document(causal, window=24, T=280)",
                0,
            ),
        ],
        "document",
    )
    panels(
        [(patterns.prefix_lm(T, 80, block_size=bs), "prefix_lm(prefix_len=80)", 0)],
        "prefix_lm",
        width=4.6,
    )


if __name__ == "__main__":
    main()
