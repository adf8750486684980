"""Draw the part-B pictures of docs/patterns.md: multi_axis, topk_blocks, permuted_blocks
(docs/images/pattern_{multi_axis,topk_blocks,permuted_blocks}.png).

Run from the repository root with matplotlib installed:

    PYTHONPATH=python python docs/images/make_pattern_images_b.py

Every picture is computed with tokenmix.patterns on seeded data, so it shows what the builders
build. Token x token masks use the colours of make_pattern_images.py: dark blue = full blocks,
mid blue = kept elements of partial blocks, light grey = dropped elements of partial blocks,
white = skipped blocks.
"""

from __future__ import annotations

import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(HERE))
from make_pattern_images import COLOURS, LEGEND, picture  # noqa: E402
from tokenmix.patterns import multi_axis, permuted_blocks, topk_blocks  # noqa: E402

CMAP = ListedColormap(COLOURS)


def _show(ax, img, block: int | None, title: str, xlabel: str, ylabel: str) -> None:
    ax.imshow(img.numpy(), cmap=CMAP, vmin=0, vmax=3, interpolation="nearest")
    if block:
        n_q, n_k = img.shape
        for x in range(block, n_k, block):
            ax.axvline(x - 0.5, color="#bbbbbb", lw=0.3)
        for y in range(block, n_q, block):
            ax.axhline(y - 0.5, color="#bbbbbb", lw=0.3)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)


def _save(fig, name: str, h_pad: float = 1.08) -> pathlib.Path:
    fig.legend(handles=LEGEND, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 0.98), h_pad=h_pad)
    path = HERE / f"pattern_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def multi_axis_picture() -> pathlib.Path:
    height = width = 8
    block, grid = 4, 2
    pat = multi_axis(height, width, block, grid)
    query = 2 * width + 5  # token (y=2, x=5)
    plain = ListedColormap(["#ffffff", COLOURS[3], "#d62728"])  # dropped, kept, the query
    fig, axes = plt.subplots(2, 3, figsize=(11.5, 8.8))
    for row, axis in enumerate(("block", "grid")):
        layout = getattr(pat, f"{axis}_layout")
        permuted = layout.dense_mask()[0, 0]
        order = pat.order[axis]
        raster = torch.zeros_like(permuted)
        raster[order.view(-1, 1), order.view(1, -1)] = permuted
        image = raster[query].view(height, width).long()
        image[query // width, query % width] = 2
        ax = axes[row, 0]
        ax.imshow(image.numpy(), cmap=plain, vmin=0, vmax=2, interpolation="nearest")
        ax.set_title(
            f"{axis} attention: keys (blue) of the red query\n8x8 image, block=4, grid=2",
            fontsize=9,
        )
        ax.set_xlabel("x", fontsize=8)
        ax.set_ylabel("y", fontsize=8)
        ax.set_xticks(range(width))
        ax.set_yticks(range(height))
        ax.tick_params(labelsize=7)
        for p in range(1, width):
            ax.axvline(p - 0.5, color="#bbbbbb", lw=0.6)
        for p in range(1, height):
            ax.axhline(p - 0.5, color="#bbbbbb", lw=0.6)
        ax = axes[row, 1]
        ax.imshow(raster.long().numpy(), cmap=plain, vmin=0, vmax=2, interpolation="nearest")
        ax.set_title(f"{axis}: kept pairs in raster order\n(not block-sparse)", fontsize=9)
        ax.set_xlabel("key (raster index)", fontsize=8)
        ax.set_ylabel("query (raster index)", fontsize=8)
        ax.tick_params(labelsize=7)
        name = "window" if axis == "block" else "grid"
        group = pat.group_size[axis]
        _show(
            axes[row, 2],
            picture(layout),
            group,
            f"{axis}: the layout, in {name} order\n(full diagonal {group}-token blocks)",
            f"key ({name}-order position)",
            f"query ({name}-order position)",
        )
    return _save(fig, "multi_axis", h_pad=3.0)


def topk_picture() -> pathlib.Path:
    g = torch.Generator().manual_seed(0)
    length, b = 512, 32
    q = torch.randn(1, length, 4, 32, generator=g)
    k = torch.randn(1, length, 2, 32, generator=g)
    # Two "hot" key blocks that the queries like (a shared direction), as in real attention maps.
    direction = torch.randn(32, generator=g)
    q += direction * 0.5
    k[:, 3 * b : 4 * b] += direction * 1.5
    k[:, 9 * b : 10 * b] += direction * 1.5
    panels = [
        ("pooling='mean', causal", dict(pooling="mean", causal=True)),
        ("pooling='avg_maxmin', causal", dict(pooling="avg_maxmin", causal=True)),
        ("pooling='mean', causal=False", dict(pooling="mean", causal=False)),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12.5, 5.0))
    for ax, (title, kw) in zip(axes, panels, strict=True):
        layout = topk_blocks(q, k, b, topk=5, sinks=1, local=1, **kw)
        _show(
            ax,
            picture(layout),
            b,
            f"{title}\ntopk=5, sinks=1, local=1 (K/V head 0)",
            "key",
            "query",
        )
    fig.suptitle("topk_blocks: 512 tokens, 32-token blocks, hot key blocks 3 and 9", fontsize=10)
    return _save(fig, "topk_blocks")


def permuted_picture() -> pathlib.Path:
    g = torch.Generator().manual_seed(1)
    length, b, seg = 512, 16, 128
    d = 32
    q = torch.randn(1, length, 1, d, generator=g)
    k = torch.randn(1, length, 1, d, generator=g)
    # "Vertical lines": scattered keys every query attends to (PBS's motivating pattern).
    direction = torch.randn(d, generator=g)
    q += direction * 0.6
    hot = torch.randperm(length, generator=g)[:40]
    k[0, hot, 0] += direction * 1.5
    r = permuted_blocks(q, k, b, seg, threshold=0.6)
    img = picture(r.layout)
    original = torch.zeros_like(img).scatter(-1, r.key_order[0, 0].view(1, -1).expand_as(img), img)
    kept = r.layout.kept_pairs() / (length * (length + 1) / 2)
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 6.2))
    _show(
        axes[0],
        img,
        seg,
        "layout on the permuted keys (lines: 128-token segments)\n"
        "diagonal segments + selected blocks + key 0's block",
        "key (permuted position)",
        "query",
    )
    _show(
        axes[1],
        original,
        None,
        f"the same, keys in original order\n(causal; {kept:.0%} of the causal pairs kept)",
        "key (original position)",
        "query",
    )
    return _save(fig, "permuted_blocks")


def main() -> None:
    for make in (multi_axis_picture, topk_picture, permuted_picture):
        print(make().relative_to(ROOT))


if __name__ == "__main__":
    main()
