"""Draw the pictures of docs/patterns_part_b.md (multi-axis, top-k blocks, permuted blocks).

Run from the repository root:

    PYTHONPATH=python python docs/images/make_pattern_images_b.py

Every picture is computed with tokenmix.patterns (seeded), so it shows what the builders build.
"""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from tokenmix.patterns import multi_axis, permuted_blocks, topk_blocks  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
KEEP = ListedColormap(["#f4f4f4", "#2b6cb0"])
STATUS = ListedColormap(["#f4f4f4", "#f6ad55", "#2b6cb0"])  # skipped, partial, full


def _grid_lines(ax, n, step, color="#999999"):
    for p in range(step, n, step):
        ax.axhline(p - 0.5, color=color, lw=0.4)
        ax.axvline(p - 0.5, color=color, lw=0.4)


def multi_axis_picture() -> pathlib.Path:
    height = width = 8
    block, grid = 4, 2
    pat = multi_axis(height, width, block, grid)
    t = height * width
    query = 2 * width + 5  # token (y=2, x=5)
    fig, axes = plt.subplots(2, 3, figsize=(11.5, 7.6))
    for row, axis in enumerate(("block", "grid")):
        layout = getattr(pat, f"{axis}_layout")
        permuted = layout.dense_mask()[0, 0]
        order = pat.order[axis]
        raster = torch.zeros_like(permuted)
        raster[order.view(-1, 1), order.view(1, -1)] = permuted
        image = raster[query].view(height, width).float()
        image[query // width, query % width] = 2
        ax = axes[row, 0]
        ax.imshow(image, cmap=ListedColormap(["#f4f4f4", "#2b6cb0", "#e53e3e"]), vmin=0, vmax=2)
        ax.set_title(f"{axis} attention: keys of the red query\n(8x8 image, block=4, grid=2)")
        ax.set_xticks(range(width))
        ax.set_yticks(range(height))
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        for p in range(1, width):
            ax.axvline(p - 0.5, color="white", lw=0.8)
        for p in range(1, height):
            ax.axhline(p - 0.5, color="white", lw=0.8)
        ax = axes[row, 1]
        ax.imshow(raster, cmap=KEEP, interpolation="nearest")
        ax.set_title(f"{axis}: T x T mask, raster order\n(not block-sparse)")
        ax.set_xlabel("key (raster index)")
        ax.set_ylabel("query (raster index)")
        ax = axes[row, 2]
        ax.imshow(permuted, cmap=KEEP, interpolation="nearest")
        group = pat.group_size[axis]
        name = "window" if axis == "block" else "grid"
        _grid_lines(ax, t, group)
        ax.set_title(f"{axis}: T x T mask, {name} order\n(dense diagonal {group}-token blocks)")
        ax.set_xlabel(f"key ({name}-order position)")
        ax.set_ylabel(f"query ({name}-order position)")
    fig.tight_layout()
    path = HERE / "patterns_multi_axis.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    fig, axes = plt.subplots(1, 3, figsize=(13, 5.4))
    for ax, (title, kw) in zip(axes, panels, strict=True):
        layout = topk_blocks(q, k, b, topk=5, sinks=1, local=1, **kw)
        status = layout.block_status()[0, 0]
        ax.imshow(status, cmap=STATUS, vmin=0, vmax=2, interpolation="nearest")
        ax.set_title(f"{title}\ntopk=5, sinks=1, local=1 (K/V head 0)", fontsize=10)
        ax.set_xlabel("kv block")
        ax.set_ylabel("query block")
        n = status.shape[0]
        ax.set_xticks(range(0, n, 2))
        ax.set_yticks(range(0, n, 2))
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#2b6cb0", "#f6ad55", "#f4f4f4")]
    fig.legend(
        handles,
        ["full block", "partial block (causal rule)", "skipped"],
        loc="lower center",
        ncol=3,
    )
    fig.suptitle("topk_blocks: 512 tokens, 32-token blocks, hot kv blocks 3 and 9")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = HERE / "patterns_topk_blocks.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    mask_perm = r.layout.dense_mask()[0, 0]
    mask_orig = torch.zeros_like(mask_perm).scatter(
        -1, r.key_order[0, 0].view(1, -1).expand_as(mask_perm), mask_perm
    )
    kept = r.layout.kept_pairs() / (length * (length + 1) / 2)
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.8))
    ax = axes[0]
    ax.imshow(r.layout.block_status()[0, 0], cmap=STATUS, vmin=0, vmax=2, interpolation="nearest")
    ax.set_title(
        "block status, permuted key order\n(diagonal segments + selected blocks)", fontsize=10
    )
    ax.set_xlabel("kv block (permuted)")
    ax.set_ylabel("query block")
    for p in range(seg // b, length // b, seg // b):
        ax.axhline(p - 0.5, color="#444444", lw=0.6)
        ax.axvline(p - 0.5, color="#444444", lw=0.6)
    ax = axes[1]
    ax.imshow(mask_perm, cmap=KEEP, interpolation="nearest")
    ax.set_title("token mask, permuted key order\n(keys sorted within 128-token segments)")
    ax.set_xlabel("key (permuted position)")
    ax.set_ylabel("query")
    ax = axes[2]
    ax.imshow(mask_orig, cmap=KEEP, interpolation="nearest")
    ax.set_title(
        f"the same mask, original key order\n(causal; {kept:.0%} of the causal pairs kept)"
    )
    ax.set_xlabel("key (original position)")
    ax.set_ylabel("query")
    fig.tight_layout()
    path = HERE / "patterns_permuted_blocks.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    for make in (multi_axis_picture, topk_picture, permuted_picture):
        print(make())


if __name__ == "__main__":
    main()
