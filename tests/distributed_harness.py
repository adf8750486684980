"""Runs tokenmix.distributed cases as gloo process groups and the same cases in one process.

A case is a dict: ``kind`` (``na``, ``linear``, ``delta``, ``bs``), ``seed``, the operator's
arguments and optionally ``sizes`` (the shard lengths). Every rank builds the whole inputs from
the seed, takes its shard, runs the distributed operator forward and backward against seeded
output gradients, and saves its outputs and input gradients; :func:`compare` puts the ranks'
pieces together and measures them against the single-process operator.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback

import tokenmix
import tokenmix.distributed as tmd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

# ---- inputs --------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def make_inputs(case: dict) -> tuple[dict, set, set]:
    """(tensors, sharded names, replicated names): every floating tensor is differentiable.
    ``poison: (name, index)`` puts a NaN at ``tensor[index]``."""
    tensors, sharded, replicated = _make_inputs(case)
    if case.get("poison"):
        name, index = case["poison"]
        tensors[name][index] = float("nan")
    return tensors, sharded, replicated


def _make_inputs(case: dict) -> tuple[dict, set, set]:
    gen = _gen(case["seed"])
    dtype = case.get("dtype", torch.float32)
    kind = case["kind"]
    t: dict[str, torch.Tensor] = {}
    if kind == "na":
        b, spatial, h, hkv, d = (
            case["batch"],
            case["spatial"],
            case["heads"],
            case["heads_kv"],
            case["dim"],
        )
        t["q"] = _randn(gen, b, *spatial, h, d, dtype=dtype)
        t["k"] = _randn(gen, b, *spatial, hkv, d, dtype=dtype)
        t["v"] = _randn(gen, b, *spatial, hkv, d, dtype=dtype)
        kernel = case["kernel_size"]
        kernel = (kernel,) * len(spatial) if isinstance(kernel, int) else kernel
        if case.get("rpb"):
            t["rpb"] = _randn(gen, h, *(2 * x - 1 for x in kernel), dtype=dtype, scale=0.5)
        if case.get("extra"):
            t["additional_keys"] = _randn(gen, b, case["extra"], hkv, d, dtype=dtype)
            t["additional_values"] = _randn(gen, b, case["extra"], hkv, d, dtype=dtype)
        return t, {"q", "k", "v"}, {"rpb", "additional_keys", "additional_values"}
    if kind in ("linear", "delta"):
        b, length, h, dk, dv = (
            case["batch"],
            case["length"],
            case["heads"],
            case["dim_k"],
            case["dim_v"],
        )
        t["q"] = _randn(gen, b, length, h, dk, dtype=dtype)
        t["k"] = F.normalize(_randn(gen, b, length, h, dk, dtype=torch.float64), dim=-1).to(dtype)
        t["v"] = _randn(gen, b, length, h, dv, dtype=dtype)
        if case.get("normalize"):  # positive features keep the normalizer away from 0
            t["q"] = (F.elu(t["q"].double()) + 1).to(dtype)
            t["k"] = (F.elu(t["k"].double() * 3) + 1).to(dtype)
        decay = case.get("decay")
        aux = torch.float64 if dtype == torch.float64 else torch.float32  # gates, states
        if decay == "g":
            t["g"] = F.logsigmoid(_randn(gen, b, length, h, dtype=aux) + 2.0)
        elif decay == "g_gamma":
            t["g_gamma"] = torch.log(1 - 2.0 ** (-5.0 - torch.arange(h, dtype=aux)))
        elif decay == "gk":
            t["gk"] = F.logsigmoid(_randn(gen, b, length, h, dk, dtype=aux) + 2.0)
        if kind == "delta":
            t["beta"] = torch.sigmoid(_randn(gen, b, length, h, dtype=aux))
        if case.get("initial_state"):
            n = b if case.get("cu_seqlens") is None else len(case["cu_seqlens"]) - 1
            width = dv + int(case.get("normalize", False))
            t["initial_state"] = _randn(gen, n, h, dk, width, dtype=aux, scale=0.3)
            if case.get("normalize"):
                t["initial_state"][..., -1] = t["initial_state"][..., -1].abs() + 1.0
        return t, {"q", "k", "v", "g", "gk", "beta"}, {"g_gamma", "initial_state"}
    if kind == "bs":
        b, length, h, hkv, d = (
            case["batch"],
            case["length"],
            case["heads"],
            case["heads_kv"],
            case["dim"],
        )
        t["q"] = _randn(gen, b, length, h, d, dtype=dtype)
        t["k"] = _randn(gen, b, length, hkv, d, dtype=dtype)
        t["v"] = _randn(gen, b, length, hkv, d, dtype=dtype)
        return t, {"q", "k", "v"}, set()
    raise ValueError(kind)


def make_layout(case: dict) -> tokenmix.BlockLayout:
    length, block = case["length"], case["block"]
    rule = case["rule"]
    if rule == "causal":
        em = tokenmix.ElementMask.causal()
    elif rule == "window":
        em = tokenmix.ElementMask.sliding_window(case["window"], case["window"] // 2)
    elif rule == "documents":
        doc = torch.tensor(case["doc_ids"], dtype=torch.int32).view(1, -1)
        em = tokenmix.ElementMask.document(doc, doc)
    elif rule == "random":
        gen = _gen(case["seed"] + 7)
        nb = -(-length // block)
        status = (
            torch.rand(case["layout_batch"], case["layout_heads"], nb, nb, generator=gen) < 0.35
        ).to(torch.int64)
        status = torch.where(torch.rand(status.shape, generator=gen) < 0.4, status * 2, status)
        bits_gen = _gen(case["seed"] + 9)
        table = torch.rand(length, length, generator=bits_gen) < 0.5

        def mask_mod(b, h, q, k):
            return table[q, k] | (q == k)

        return tokenmix.BlockLayout.from_block_status(
            status, block_size=block, seq_lengths=(length, length), mask_bits_fn=mask_mod
        )
    else:
        raise ValueError(rule)
    return tokenmix.BlockLayout.from_element_mask(em, length, length, block)


def run_operator(case: dict, tensors: dict, group=None, distributed: bool = False) -> dict:
    """The operator on these tensors: ``{output name: tensor}``."""
    kind = case["kind"]
    if kind == "na":
        fn = tmd.neighborhood_attention if distributed else tokenmix.neighborhood_attention
        extra = {"group": group} if distributed else {}
        out, lse = fn(
            tensors["q"],
            tensors["k"],
            tensors["v"],
            case["kernel_size"],
            case.get("stride", 1),
            case.get("dilation", 1),
            case.get("is_causal", False),
            rpb=tensors.get("rpb"),
            additional_keys=tensors.get("additional_keys"),
            additional_values=tensors.get("additional_values"),
            return_lse=True,
            **extra,
        )
        return {"out": out, "lse": lse}
    if kind in ("linear", "delta"):
        cu = case.get("cu_seqlens")
        kw = dict(
            initial_state=tensors.get("initial_state"),
            output_final_state=True,
            cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int64),
            g=tensors.get("g"),
        )
        if distributed:
            kw["group"] = group
        if kind == "linear":
            lib = tmd if distributed else tokenmix
            kw.update(g_gamma=tensors.get("g_gamma"), gk=tensors.get("gk"))
            kw.update(normalize=case.get("normalize", False), causal=case.get("causal", True))
            o, final = lib.linear_attention(tensors["q"], tensors["k"], tensors["v"], **kw)
        else:
            lib = tmd if distributed else tokenmix
            o, final = lib.delta_rule(
                tensors["q"], tensors["k"], tensors["v"], tensors["beta"], **kw
            )
        return {"o": o, "final": final}
    if kind == "bs":
        layout = make_layout(case)
        fn = tmd.block_sparse_attention if distributed else tokenmix.block_sparse_attention
        extra = {"group": group} if distributed else {}
        out, lse = fn(tensors["q"], tensors["k"], tensors["v"], layout, return_lse=True, **extra)
        return {"out": out, "lse": lse}
    raise ValueError(kind)


SHARDED_OUTPUTS = {"out", "lse", "o"}


def output_grads(case: dict, shapes: dict) -> dict:
    """Seeded gradients for the whole outputs (``{name: (shape, dtype)}``)."""
    gen = _gen(case["seed"] + 1000)
    return {n: _randn(gen, *shapes[n][0], dtype=shapes[n][1]) for n in sorted(shapes)}


def _masked(name: str, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """No gradient into an LSE of -inf (a row that attends nothing)."""
    if name != "lse":
        return grad
    return torch.where(torch.isfinite(out), grad, torch.zeros_like(grad))


def shard_sizes_for(case: dict, length: int, world: int) -> list[int]:
    sizes = case.get("sizes", {}).get(world)  # {world size: shard lengths}
    if sizes is not None:
        return list(sizes)
    return tmd.shard_sizes(length, world, case.get("block", 1))


# ---- the two runs ---------------------------------------------------------------------------


def _rank_run(case: dict, rank: int, world: int) -> dict:
    tensors, sharded, _ = make_inputs(case)
    length = tensors["q"].shape[1]
    sizes = shard_sizes_for(case, length, world)
    start = sum(sizes[:rank])
    leaves = {}
    for n, x in tensors.items():
        local = x.narrow(1, start, sizes[rank]) if n in sharded else x
        leaves[n] = local.clone().requires_grad_(x.is_floating_point())
    if case.get("bad_rank") == rank:  # ``bad: (name, new shape)`` on that rank only
        name, shape = case["bad"]
        leaves[name] = torch.zeros(shape, dtype=leaves[name].dtype)
        try:
            run_operator(case, leaves, distributed=True)
        except Exception as exc:
            return {"raised": f"{type(exc).__name__}: {exc}"}
        return {"raised": None}
    if case.get("bad_rank") is not None:
        try:
            run_operator(case, leaves, distributed=True)
        except Exception as exc:
            return {"raised": f"{type(exc).__name__}: {exc}"}
        return {"raised": None}
    with tmd.count_bytes() as sent:
        outputs = run_operator(case, leaves, distributed=True)
        shapes = {}
        for n, o in outputs.items():
            shape = list(o.shape)
            if n in SHARDED_OUTPUTS:
                shape[1] = length
            shapes[n] = (shape, o.dtype)
        grads = output_grads(case, shapes)
        loss = 0
        for n, o in outputs.items():
            if case.get("loss_of", n) != n:
                continue
            g = grads[n].narrow(1, start, sizes[rank]) if n in SHARDED_OUTPUTS else grads[n]
            loss = loss + (o * _masked(n, g, o.detach())).sum()
        if not case.get("forward_only"):
            loss.backward()
    return {
        "outputs": {n: o.detach() for n, o in outputs.items()},
        "grads": {n: x.grad for n, x in leaves.items() if x.grad is not None},
        "sizes": sizes,
        "bytes": (sent.point_to_point, sent.collective),
    }


def _worker(rank: int, world: int, init_file: str, cases: list, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    results = {}
    try:
        for i, case in enumerate(cases):
            try:
                run = _module_rank_run if case["kind"] == "module" else _rank_run
                results[i] = run(case, rank, world)
            except Exception:
                results[i] = {"error": traceback.format_exc()}
                # Other ranks may now wait on this one: give up on the rest.
                break
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        if all("error" not in r for r in results.values()):
            dist.destroy_process_group()
        else:
            os._exit(0)


def run_ranks(world: int, cases: list) -> list[dict]:
    """Every case on ``world`` gloo processes; per rank ``{case index: result}``."""
    with tempfile.TemporaryDirectory(prefix="tokenmix-dist-") as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(world, init_file, cases, tmp), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def _single_process(case: dict, tensors: dict, grads_from=None):
    leaves = {n: x.clone().requires_grad_(x.is_floating_point()) for n, x in tensors.items()}
    outputs = run_operator(case, leaves)
    shapes = {n: (list(o.shape), o.dtype) for n, o in outputs.items()}
    grads = output_grads(case, shapes) if grads_from is None else grads_from
    loss = 0
    for n, o in outputs.items():
        if case.get("loss_of", n) != n:  # ``loss_of``: the one output the loss reads
            continue
        g = grads[n].to(o.dtype)
        loss = loss + (o * _masked(n, g, o.detach())).sum()
    loss.backward()
    results = {n: o.detach() for n, o in outputs.items()}
    results.update({f"d{n}": x.grad for n, x in leaves.items() if x.grad is not None})
    return results, grads


def _relative(got: torch.Tensor, want: torch.Tensor, name: str) -> float:
    """Largest difference relative to the largest magnitude of ``want`` (finite entries; the
    infinities must sit in the same places)."""
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{name}: infinities differ"
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaNs differ"
    finite = torch.isfinite(want)
    if not finite.any():
        return 0.0
    scale = float(want[finite].abs().max())
    return float((got[finite] - want[finite]).abs().max()) / max(scale, 1e-30)


def compare(case: dict, per_rank: list[dict]) -> dict[str, tuple[float, float]]:
    """Per output and input gradient: ``(distributed error, single-process error)``.

    The distributed error is the largest difference between the ranks (their pieces put
    together, or each rank's copy of a replicated tensor) and the single-process operator,
    relative to the largest magnitude of the single-process tensor; 0 means bitwise equal.
    The single-process error is that operator's own difference from float64 (0 for float64
    cases): the rounding noise the two runs may differ by."""
    for r, res in enumerate(per_rank):
        if "error" in res:
            raise AssertionError(f"rank {r} failed:\n{res['error']}")
    if case["kind"] == "module":
        return _compare_module(case, per_rank)
    tensors, sharded, _ = make_inputs(case)
    single, grads = _single_process(case, tensors)
    if tensors["q"].dtype == torch.float64:
        truth = None
    else:
        wide = {n: x.double() if x.is_floating_point() else x for n, x in tensors.items()}
        truth, _ = _single_process(case, wide, grads_from=grads)
    diffs = {}
    for name, want in single.items():
        if case.get("forward_only") and name.startswith("d"):
            continue
        base = name[1:] if name.startswith("d") else name
        if base in SHARDED_OUTPUTS or base in sharded:
            source = "outputs" if name in SHARDED_OUTPUTS else "grads"
            key = name if source == "outputs" else base
            pieces = [res[source][key] for res in per_rank]
            got = [torch.cat(pieces, dim=1)]
        elif name.startswith("d"):  # a replicated input: the ranks' shares add up
            got = [sum(res["grads"][base] for res in per_rank)]
        else:  # a replicated output: every rank holds all of it
            got = [res["outputs"][name] for res in per_rank]
        noise = 0.0 if truth is None else _relative(want.double(), truth[name], name)
        worst = max(_relative(g, want, name) for g in got)
        diffs[name] = (worst, noise)
    return diffs


# ---- whole layers under context_parallel ---------------------------------------------------


def make_module(case: dict) -> torch.nn.Module:
    return _make_module(case).to(case.get("dtype", torch.float32))


def _make_module(case: dict) -> torch.nn.Module:
    torch.manual_seed(case["seed"])
    dim, heads = case["dim"], case["heads"]
    layer = case["layer"]
    if layer == "na2d":
        return tokenmix.nn.NeighborhoodAttention2D(
            dim, heads, kernel_size=5, dilation=(1, 2), rel_pos_bias=True
        )
    if layer == "natten2d":
        from tokenmix.compat import natten

        return natten.NeighborhoodAttention2D(dim, heads, kernel_size=3, is_causal=(True, False))
    if layer == "linear":
        return tokenmix.nn.LinearAttention(
            dim, heads, feature_map="elu+1", decay="gated", normalize=True
        )
    if layer == "gdn":
        return tokenmix.nn.GatedDeltaNet(dim, heads)
    if layer == "bs":
        layout = tokenmix.BlockLayout.from_element_mask(
            tokenmix.ElementMask.causal(), case["length"], case["length"], 16
        )
        return tokenmix.nn.BlockSparseAttention(dim, heads, layout)
    raise ValueError(layer)


def _module_input(case: dict) -> torch.Tensor:
    shape = (1, case["length"], *case.get("extra_spatial", ()), case["dim"])
    return _randn(_gen(case["seed"] + 5), *shape, dtype=case.get("dtype", torch.float32))


def _module_forward(model, x):
    y = model(x)
    return y[0] if isinstance(y, tuple) else y


def _module_rank_run(case: dict, rank: int, world: int) -> dict:
    model = make_module(case)
    tmd.context_parallel(model)
    x_full = _module_input(case)
    sizes = shard_sizes_for(case, x_full.shape[1], world)
    start = sum(sizes[:rank])
    x = x_full.narrow(1, start, sizes[rank]).clone().requires_grad_()
    y = _module_forward(model, x)
    gy = _randn(_gen(case["seed"] + 6), *y.shape[:1], x_full.shape[1], *y.shape[2:], dtype=y.dtype)
    (y * gy.narrow(1, start, sizes[rank])).sum().backward()
    # The per-token layers' parameter gradients are partial sums per rank: sum them (what
    # DDP over the same group does, up to its averaging).
    params = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        params[name] = g
    return {"outputs": {"y": y.detach()}, "grads": {"x": x.grad}, "params": params}


def _module_run_whole(case: dict, dtype: torch.dtype):
    model = _make_module(case).to(dtype)
    x = _module_input(case).to(dtype).requires_grad_()
    y = _module_forward(model, x)
    gy = _randn(_gen(case["seed"] + 6), *y.shape, dtype=case.get("dtype", torch.float32))
    (y * gy.to(dtype)).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def _compare_module(case: dict, per_rank: list[dict]) -> dict[str, tuple[float, float]]:
    """As :func:`compare`, for a layer under ``context_parallel``. The parameter gradients are
    the ranks' shares summed (the data-parallel reduction), so in float32 their rounding
    differs from one process by the order of that sum: their second number is the
    single-process float32 error against float64, for the tests' allowance."""
    y, dx, params = _module_run_whole(case, case.get("dtype", torch.float32))
    if case.get("dtype", torch.float32) == torch.float64:
        truth = None
    else:
        truth = _module_run_whole(case, torch.float64)[2]
    diffs = {
        "y": (_relative(torch.cat([r["outputs"]["y"] for r in per_rank], 1), y, "y"), 0.0),
        "dx": (_relative(torch.cat([r["grads"]["x"] for r in per_rank], 1), dx, "dx"), 0.0),
    }
    for name, grad in params.items():
        worst = max(_relative(r["params"][name], grad, name) for r in per_rank)
        noise = 0.0 if truth is None else _relative(grad.double(), truth[name], name)
        diffs[f"d{name}"] = (worst, noise)
    return diffs
