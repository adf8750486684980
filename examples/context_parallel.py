"""A model with neighborhood attention and Gated DeltaNet, run with its tokens sharded across
the ranks of a process group, checked against the same model in one process.

    torchrun --nproc-per-node 2 examples/context_parallel.py          # gloo on CPUs
    torchrun --nproc-per-node 4 examples/context_parallel.py --nccl   # one GPU per rank

Every rank builds the same model and the same whole input (seeded), keeps its rows of the
input, runs forward and backward, and sums the parameter gradients over the ranks (what DDP
over the same group does, up to its averaging). Rank 0 prints the largest differences from
the single-process run and the bytes each rank sent.
"""

from __future__ import annotations

import argparse
import os

import tokenmix
import tokenmix.distributed as tmd
import torch
import torch.distributed as dist
from torch import nn


class VideoBlock(nn.Module):
    """Spatial neighborhood attention per frame row, then a token-mixing scan."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.spatial = tokenmix.nn.NeighborhoodAttention2D(dim, heads, kernel_size=7)
        self.scan = tokenmix.nn.GatedDeltaNet(dim, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, H, W, dim]
        x = x + self.spatial(self.norm1(x))
        b, h, w, c = x.shape
        y, _ = self.scan(self.norm2(x).reshape(b, h * w, c))  # tokens in row-major order
        return x + y.reshape(b, h, w, c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nccl", action="store_true", help="NCCL with one GPU per rank")
    args = parser.parse_args()
    if args.nccl:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if args.nccl else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if args.nccl else torch.device("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)
    model = VideoBlock().to(device)
    x = torch.randn(2, 48, 32, 64, device=device)  # whole input, the same on every rank
    grad_y = torch.randn_like(x)

    # Single process, for the comparison.
    whole = model(x)
    whole.backward(grad_y)
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    # Sharded: rows of the first spatial dimension (48 = 24 + 24 on 2 ranks). The scan's
    # tokens are those rows flattened, so each rank's tokens are a contiguous run too.
    tmd.context_parallel(model)
    x_mine = tmd.shard(x, dim=1).clone().requires_grad_()
    with tmd.count_bytes() as sent:
        y_mine = model(x_mine)
        y_mine.backward(tmd.shard(grad_y, dim=1))
        for p in model.parameters():  # per-token layers: each rank holds a share
            dist.all_reduce(p.grad)

    def relative(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return (got - ref).abs().max() / ref.abs().max()

    out_err = relative(y_mine, tmd.shard(whole, dim=1))
    grad_err = max(relative(p.grad, want[n]) for n, p in model.named_parameters())
    errors = torch.stack([out_err, grad_err]).to(device)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    sent_all = [None] * world
    dist.all_gather_object(sent_all, sent.by_operator)
    if rank == 0:
        print(f"{world} ranks, rows per rank: {tmd.shard_sizes(x.shape[1], world)}")
        print(
            f"largest difference from one process, relative to the largest value: "
            f"output {errors[0]:.1e}, parameter gradients {errors[1]:.1e}"
        )
        for r, by_op in enumerate(sent_all):
            print(f"rank {r} sent " + ", ".join(f"{k}: {v} B" for k, v in sorted(by_op.items())))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
