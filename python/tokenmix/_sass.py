"""`python -m tokenmix sass-report`: a static performance model of the shipped CUDA kernels.

For every kernel and architecture in the built library, the SASS (from ``cuobjdump -sass``) is
split into basic blocks, loops are found from the control-flow graph (natural loops of its
dominator tree), and the kernel's *main loop* is the one holding the most tensor-core
instructions (the innermost such loop), or the largest loop without any. One iteration of it is
followed along two paths from its header to a back edge:

* the *main path*: the most tensor-core work, then the most global->shared copies (a steady-state
  iteration also loads the next chunk), then the fewest instructions: a chunk with no optional
  work such as masking;
* the *longest path*: the most tensor-core work, then the most instructions (every optional step).

Inner loops count once per trip when their trip count is a constant (an induction register
stepped by an immediate and compared with one), else once. The instructions on the main path are
counted by class and give an upper bound on the tensor pipe's utilization per SM sub-partition::

    bound = tensor_cycles / max(issue_cycles, tensor_cycles, smem_cycles)

* issue: one warp instruction per cycle per sub-partition, so every instruction on the path is
  a cycle (an unpredicated CALL adds its subroutine's length);
* tensor: each HMMA occupies the pipe for its FMAs divided by the architecture's dense fp16 FMAs
  per cycle per sub-partition (``TENSOR_FMA_PER_CYCLE``; a tf32 FMA counts as two, its rate
  being half of fp16's), so the bound is a share of the architecture's peak fp16 tensor
  throughput;
* shared memory: the SM moves one 128-byte wavefront per cycle for its four sub-partitions, so a
  path with W wavefronts (LDS/STS/LDSM/LDGSTS, counted from their widths, conflict-free) costs
  4 W cycles when every sub-partition runs it.

The model ignores latency, dependencies, occupancy, bank conflicts, memory bandwidth and the work
outside the main loop; docs/cuda_engine.md ("The static SASS model") says more.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

from . import _ops

__all__ = [
    "Kernel",
    "analyze",
    "find_cuobjdump",
    "format_report",
    "parse_sass",
    "sass_report",
    "to_dict",
]

# Dense fp16 FMAs per cycle per SM sub-partition: A100 (sm_80) 1024 per SM; H100 (sm_90) 2048 per
# SM at wgmma's rate, which legacy HMMA does not exceed, so the bound stays an upper bound.
TENSOR_FMA_PER_CYCLE = {"sm_80": 256, "sm_86": 128, "sm_89": 128, "sm_90": 512}
SUB_PARTITIONS = 4  # per SM: shared memory serves all four at one wavefront per cycle

CLASSES = (
    "hmma",
    "ldsm",
    "ldgsts",
    "lds",
    "sts",
    "ldg",
    "stg",
    "int_div",
    "mufu",
    "bar",
    "imad_wide",
    "local",
)

_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$")
_ARCH = re.compile(r"code for (sm_\d+a?)")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")
_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")
_WIDTH = re.compile(r"\.(64|128)\b")
# FMAs per warp of each HMMA shape (m n k): 16816 = m16 n8 k16.
_HMMA_FMA = {"16816": 16 * 8 * 16, "1688": 16 * 8 * 8, "884": 8 * 8 * 4, "16832": 16 * 8 * 32}


@dataclass
class Instruction:
    addr: int
    text: str  # without the guard predicate
    guard: str  # "@P0", "@!P1" or ""

    @property
    def predicated(self) -> bool:
        return bool(self.guard)

    @property
    def op(self) -> str:
        return self.text.split(" ", 1)[0]


@dataclass
class Kernel:
    name: str  # mangled
    arch: str
    instructions: list[Instruction]
    loop: tuple[int, int] | None = None  # main loop: indices of its head and its back edge
    path_length: int = 0  # instructions issued on the main path of one iteration
    longest_path_length: int = 0  # on the longest path with as much tensor work (masked chunks)
    counts: dict[str, int] = field(default_factory=dict)
    tensor_cycles: float = 0.0
    smem_wavefronts: float = 0
    inner_loops: int = 0  # loops inside the main loop (bodies counted once per trip)
    unknown_trips: int = 0  # inner loops without a constant trip count (counted once)
    opcodes: dict[str, int] = field(default_factory=dict)  # main path, by opcode (no modifiers)
    main_path: list[int] = field(default_factory=list)  # its instructions' indices, in order

    @property
    def smem_cycles(self) -> float:
        return float(self.smem_wavefronts * SUB_PARTITIONS)

    def _bound(self, issued: int) -> float | None:
        if self.tensor_cycles == 0:
            return None
        return self.tensor_cycles / max(issued, self.tensor_cycles, self.smem_cycles)

    @property
    def bound(self) -> float | None:
        """Upper bound on tensor-pipe utilization (None without tensor-core work)."""
        return self._bound(self.path_length)

    @property
    def longest_bound(self) -> float | None:
        """The same bound on the longest path (every optional step taken)."""
        return self._bound(self.longest_path_length)


def tool_candidates(name: str, packages: tuple[str, ...] = ()) -> list[str]:
    """Where a CUDA binary tool may be, in order: NVIDIA's pip wheels (``nvidia/cu13``,
    ``nvidia``, ``nvidia/cuda_<name>`` and ``nvidia/<package>`` for each of ``packages``),
    $CUDA_HOME/bin, PATH. Only executable files are listed."""
    candidates = []
    try:
        import nvidia  # namespace package of NVIDIA's pip wheels

        for root in nvidia.__path__:
            for sub in ("cu13", "", f"cuda_{name}", *packages):
                candidates.append(os.path.join(root, sub, "bin", name))
    except ImportError:
        pass
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", name))
    candidates.append(shutil.which(name) or "")
    return [p for p in candidates if os.path.isfile(p) and os.access(p, os.X_OK)]


def _find_tool(name: str) -> str:
    """A CUDA binary tool from its ``nvidia-cuda-<name>`` pip package, $CUDA_HOME/bin or PATH."""
    found = tool_candidates(name)
    if found:
        return found[0]
    raise FileNotFoundError(
        f"{name} not found: `pip install nvidia-cuda-{name}` (make installs it as a development "
        "dependency), or set CUDA_HOME to a CUDA toolkit"
    )


def find_cuobjdump() -> str:
    """cuobjdump, checking that the nvdisasm it runs for ``-sass`` is there too."""
    tool = _find_tool("cuobjdump")
    _find_tool("nvdisasm")
    return tool


def parse_sass(text: str) -> list[Kernel]:
    """The kernels of ``cuobjdump -sass`` output, each with its architecture and instructions."""
    kernels: list[Kernel] = []
    arch = "unknown"
    current: Kernel | None = None
    for line in text.splitlines():
        if m := _ARCH.search(line):
            arch = m.group(1)
            continue
        if m := _FUNCTION.match(line):
            current = Kernel(m.group(1), arch, [])
            kernels.append(current)
            continue
        if current is not None and (m := _INSTRUCTION.search(line)):
            body = m.group(2)
            guard = _PREDICATE.match(body)
            current.instructions.append(
                Instruction(
                    int(m.group(1), 16),
                    _PREDICATE.sub("", body),
                    guard.group(0).strip() if guard else "",
                )
            )
    return kernels


def _tensor_fma(ins: Instruction) -> int:
    """FMAs of one warp's tensor-core instruction (HMMA.MNK, or a share of a warpgroup HGMMA), in
    fp16 FMAs: tf32 runs at half the fp16 rate on sm_80 and sm_90, so a tf32 FMA counts twice."""
    if ins.op.startswith("HMMA."):
        fma = _HMMA_FMA.get(ins.op.split(".")[1], 0)
        return 2 * fma if ".TF32" in ins.op else fma
    if ins.op.startswith("HGMMA."):
        m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", ins.op)
        if m:  # one warpgroup instruction: a quarter of its FMAs per warp (sub-partition)
            return int(m.group(1)) * int(m.group(2)) * int(m.group(3)) // 4
    return 0


def _wavefronts(ins: Instruction) -> float:
    """128-byte shared-memory wavefronts of one warp instruction (conflict-free). A warpgroup
    HGMMA reads its shared operands once for the four warps: B (N rows of 32 bytes per k-step,
    whatever the type) and, when its A is a descriptor too (not registers), A's 64 rows; each
    warp is charged a quarter."""
    op = ins.op
    if op.startswith("HGMMA."):
        m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
        if not m:
            return 0
        operands = [o.strip() for o in ins.text.split(" ", 1)[1].split(",")]
        a_shared = len(operands) > 1 and operands[1].startswith("gdesc")
        rows = int(m.group(2)) + (int(m.group(1)) if a_shared else 0)
        return rows * 32 / 128 / 4
    if op.startswith("LDSM."):
        matrices = op.rsplit(".", 1)[1]
        return int(matrices) if matrices in ("1", "2", "4") else 1
    if op.startswith(("LDS", "STS", "LDGSTS")):
        m = _WIDTH.search(op)
        return {"64": 2, "128": 4}[m.group(1)] if m else 1
    return 0


# Instruction classes by mnemonic prefix, first match wins (LDSM and LDGSTS before LDS and LDG).
_CLASS_PREFIXES = (
    (("HMMA", "HGMMA"), "hmma"),
    ("LDSM", "ldsm"),
    ("LDGSTS", "ldgsts"),
    ("LDS", "lds"),
    ("STS", "sts"),
    ("LDG", "ldg"),
    ("STG", "stg"),
    ("MUFU", "mufu"),
    ("BAR", "bar"),
    ("IMAD.WIDE", "imad_wide"),
    (("LDL", "STL"), "local"),
)


def classify(ins: Instruction) -> str | None:
    op = ins.op
    if op.startswith("I2F") and ".RP" in op:  # the reciprocal that opens an emulated division
        return "int_div"
    return next((cls for prefix, cls in _CLASS_PREFIXES if op.startswith(prefix)), None)


def _branch_target(ins: Instruction) -> int | None:
    if not ins.op.startswith(("BRA", "CALL")):
        return None
    m = _TARGET.search(ins.text)
    return int(m.group(1), 16) if m else None


def _conditional(ins: Instruction) -> bool:
    """A branch that may fall through: a guard, a predicate operand, or a divergence test."""
    return ins.predicated or "," in ins.text or ins.op in ("BRA.DIV", "BRA.CONV")


@dataclass
class _Block:
    first: int  # instruction indices [first, last]
    last: int
    succ: list[int] = field(default_factory=list)
    pred: list[int] = field(default_factory=list)


def _blocks(k: Kernel) -> list[_Block]:
    """Basic blocks and their edges (calls return; EXIT and RET end a path)."""
    n = len(k.instructions)
    index = {ins.addr: i for i, ins in enumerate(k.instructions)}
    leaders = {0}
    for i, ins in enumerate(k.instructions):
        if ins.op.startswith(("BRA", "EXIT", "RET")):
            if i + 1 < n:
                leaders.add(i + 1)
            target = _branch_target(ins) if ins.op.startswith("BRA") else None
            if target in index:
                leaders.add(index[target])
    starts = sorted(leaders)
    blocks = [_Block(a, b - 1) for a, b in zip(starts, [*starts[1:], n], strict=True)]
    block_of = {b.first: j for j, b in enumerate(blocks)}
    for j, b in enumerate(blocks):
        ins = k.instructions[b.last]
        fall = [j + 1] if j + 1 < len(blocks) else []
        if ins.op.startswith("BRA"):
            target = _branch_target(ins)
            t = [block_of[index[target]]] if target in index else []
            b.succ = t + fall if _conditional(ins) or not t else t
        elif ins.op.startswith(("EXIT", "RET")):
            b.succ = fall if ins.predicated else []
        else:
            b.succ = fall
        for s in b.succ:
            blocks[s].pred.append(j)
    return blocks


def _dominators(blocks: list[_Block]) -> list[set[int]]:
    n = len(blocks)
    everything = set(range(n))
    dom = [everything.copy() for _ in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for j in range(1, n):
            preds = [dom[p] for p in blocks[j].pred]
            new = set.intersection(*preds) | {j} if preds else {j}
            if new != dom[j]:
                dom[j], changed = new, True
    return dom


def _natural_loops(blocks: list[_Block]) -> dict[int, tuple[set[int], list[int]]]:
    """Header block -> (the loop's blocks, its latches), merging back edges to one header."""
    dom = _dominators(blocks)
    loops: dict[int, tuple[set[int], list[int]]] = {}
    for j, b in enumerate(blocks):
        for h in b.succ:
            if h in dom[j]:  # back edge j -> h
                body, work = {h, j}, [j]
                while work:
                    x = work.pop()
                    for p in blocks[x].pred:
                        # (blocks the header does not dominate are unreachable ones)
                        if p not in body and h in dom[p]:
                            body.add(p)
                            work.append(p)
                old = loops.get(h, (set(), []))
                loops[h] = (old[0] | body, [*old[1], j])
    # Rotated loops: nvcc may place a block that both enters the loop and ends its iterations
    # after the loop's body (it jumps to the header). The header does not dominate it, so it
    # is no latch by the definition above; a block laid out inside the loop's address range
    # that the body reaches and that jumps to the header is one.
    for h, (body, latches) in loops.items():
        end = max(blocks[j].last for j in latches)
        for x, b in enumerate(blocks):
            if x in body or h not in b.succ or not blocks[h].first < b.first <= end:
                continue
            if any(x in blocks[j].succ for j in body):
                body.add(x)
                latches.append(x)
    return loops


_SETP = re.compile(
    r"ISETP\.(\w+)(?:\.U32)?\.AND (U?P\d), PT, (R\d+)(?:\.reuse)?, (-?0x[0-9a-f]+), PT"
)


def _trip_count(k: Kernel, blocks: list[_Block], body: set[int], latch: int) -> int | None:
    """Iterations of an inner loop whose latch branch tests an induction register against an
    immediate (``ISETP.<cmp> P, R, imm``, ``R`` stepped by an immediate in the loop), counting
    from 0: the trips of the thread that runs longest. None when the bound or the step is not a
    constant, or the latch does not end in such a branch."""
    branch = k.instructions[blocks[latch].last]
    gm = re.match(r"@(!?)(U?P[0-9T]+)", branch.guard)
    if not branch.op.startswith("BRA") or not gm:
        return None
    negated, pred = gm.group(1) == "!", gm.group(2)
    compare = None
    for i in range(blocks[latch].last - 1, blocks[latch].first - 1, -1):
        sm = _SETP.search(k.instructions[i].text)
        if sm and sm.group(2) == pred:
            compare = i
            cmp, reg, bound = sm.group(1), sm.group(3), int(sm.group(4), 16)
            break
        if re.search(rf"\b{pred}\b", k.instructions[i].text):
            return None  # the predicate comes from something else
    if compare is None or bound <= 0:
        return None
    step = stepped_at = None
    for j in body:
        for i in range(blocks[j].first, blocks[j].last + 1):
            am = re.match(
                rf"(?:IADD3|VIADD) {reg}, {reg}(?:\.reuse)?, (0x[0-9a-f]+)(?:, RZ)?$",
                k.instructions[i].text,
            )
            if am:
                if step is not None:
                    return None  # stepped twice: not a simple counter
                step, stepped_at = int(am.group(1), 16), i
    if not step:
        return None
    # The loop goes on while the branch is taken: `@!P BRA` with P = (R >= bound), or `@P BRA`
    # with P = (R != bound) or (R < bound). A compare before the step (in the latch block) sees
    # its own trip's value: one trip more than a compare after it.
    goes_on = (negated and cmp in ("GE", "GT")) or (not negated and cmp in ("NE", "LT"))
    if not goes_on:
        return None
    trips = -(-bound // step)
    before_step = blocks[latch].first <= stepped_at <= blocks[latch].last and stepped_at > compare
    return trips + 1 if before_step and cmp != "NE" else trips


def _callee_lengths(k: Kernel) -> dict[int, int]:
    """Instructions from each CALL target to its first RET (a subroutine's straight length)."""
    index = {ins.addr: i for i, ins in enumerate(k.instructions)}
    lengths = {}
    for ins in k.instructions:
        if ins.op.startswith("CALL"):
            target = _branch_target(ins)
            if target is None or target not in index or target in lengths:
                continue
            n = 0
            for callee in k.instructions[index[target] :]:
                n += 1
                if callee.op.startswith("RET"):
                    break
            lengths[target] = n
    return lengths


def analyze(k: Kernel) -> Kernel:
    """Finds the main loop and its main path, and fills the kernel's counts and cycles."""
    if not k.instructions:
        return k
    blocks = _blocks(k)
    loops = _natural_loops(blocks)
    if not loops:
        return k

    def hmma(body: set[int]) -> int:
        return sum(
            1
            for j in body
            for ins in k.instructions[blocks[j].first : blocks[j].last + 1]
            if _tensor_fma(ins)
        )

    # The main loop: the most tensor-core instructions, then the smallest such loop; without
    # any, the largest loop.
    def rank(h: int):
        body = loops[h][0]
        count = hmma(body)
        return (count, -len(body) if count else len(body))

    header = max(loops, key=rank)
    body, latches = loops[header]
    k.loop = (blocks[header].first, max(blocks[j].last for j in latches))
    inner = {h: lp for h, lp in loops.items() if h != header and h in body and lp[0] < body}
    k.inner_loops = len(inner)

    # Each block counts once per trip of every inner loop around it; a loop without a constant
    # trip count counts once (so the bound stays an upper bound).
    weight = dict.fromkeys(body, 1)
    k.unknown_trips = 0
    for inner_body, inner_latches in inner.values():
        trips = [_trip_count(k, blocks, inner_body, j) for j in inner_latches]
        if len(trips) != 1 or trips[0] is None:
            k.unknown_trips += 1
            continue
        for j in inner_body:
            weight[j] *= trips[0]

    callee = _callee_lengths(k)

    def cost(i: int) -> int:
        ins = k.instructions[i]
        if ins.op.startswith("CALL") and not ins.predicated:
            return 1 + callee.get(_branch_target(ins), 0)
        return 1

    def block_score(j: int, kind: str) -> tuple:
        w = weight[j]
        span = k.instructions[blocks[j].first : blocks[j].last + 1]
        fma = w * sum(_tensor_fma(ins) for ins in span)
        issued = w * sum(cost(i) for i in range(blocks[j].first, blocks[j].last + 1))
        if kind == "main":
            copies = w * sum(ins.op.startswith("LDGSTS") for ins in span)
            return (fma, copies, -issued)
        return (fma, issued)

    # One iteration: paths from the header to a latch over the loop's forward edges (edges back
    # to the header or to an inner header are dropped, as are edges leaving the loop).
    loop_of = {header: body, **{h: lp[0] for h, lp in inner.items()}}

    def back_edge(j: int, s: int) -> bool:
        return s in loop_of and j in loop_of[s]

    dag = {j: [s for s in blocks[j].succ if s in body and not back_edge(j, s)] for j in body}
    # Post-order (successors before the blocks that lead to them), without recursion.
    order, seen, stack = [], {header}, [(header, iter(dag[header]))]
    while stack:
        j, rest = stack[-1]
        s = next((s for s in rest if s not in seen), None)
        if s is None:
            order.append(j)
            stack.pop()
        else:
            seen.add(s)
            stack.append((s, iter(dag[s])))

    def best_path(kind: str) -> list[int]:
        best: dict[int, tuple | None] = {}
        choice: dict[int, int | None] = {}
        for j in order:  # successors first
            own = block_score(j, kind)
            options = [s for s in dag[j] if best.get(s) is not None]
            if j in latches:
                best[j], choice[j] = own, None
                # a latch may also go on inside the loop (a latch that is not the last block)
                if options:
                    nxt = max(options, key=lambda s: best[s])
                    alt = tuple(a + b for a, b in zip(own, best[nxt], strict=True))
                    if alt > own:
                        best[j], choice[j] = alt, nxt
                continue
            if not options:
                best[j] = choice[j] = None
                continue
            nxt = max(options, key=lambda s: best[s])
            best[j] = tuple(a + b for a, b in zip(own, best[nxt], strict=True))
            choice[j] = nxt
        path, j = [], header
        while j is not None and best.get(j) is not None:
            path.append(j)
            j = choice[j]
        return path

    def totals(path: list[int]):
        counts = dict.fromkeys(CLASSES, 0)
        opcodes: dict[str, int] = {}
        fma = wavefronts = issued = 0
        for j in path:
            w = weight[j]
            for i in range(blocks[j].first, blocks[j].last + 1):
                ins = k.instructions[i]
                cls = classify(ins)
                if cls:
                    counts[cls] += w
                base = ins.op.split(".", 1)[0]
                opcodes[base] = opcodes.get(base, 0) + w * cost(i)
                fma += w * _tensor_fma(ins)
                wavefronts += w * _wavefronts(ins)
                issued += w * cost(i)
        return counts, fma, wavefronts, issued, opcodes

    # The main path: the most tensor work, then the most global->shared copies (a steady-state
    # iteration loads the next chunk), then the fewest instructions (no optional work such as
    # masking). The longest path: the most tensor work, then the most instructions.
    main = best_path("main")
    k.main_path = [i for j in main for i in range(blocks[j].first, blocks[j].last + 1)]
    k.counts, fma, k.smem_wavefronts, k.path_length, k.opcodes = totals(main)
    k.longest_path_length = totals(best_path("longest"))[3]
    per_cycle = TENSOR_FMA_PER_CYCLE.get(k.arch.rstrip("a"), 256)
    k.tensor_cycles = fma / per_cycle
    return k


def sass_report(library: str | None = None, cuobjdump: str | None = None) -> list[Kernel]:
    """Every kernel of the library (default: the installed ``_C.so``), analyzed. Disassembling
    takes about half a minute; the result is kept for the process while the file is unchanged."""
    library = os.path.abspath(library or _ops.LIBRARY_PATH)
    stat = os.stat(library)
    return list(_report(library, stat.st_mtime_ns, stat.st_size, cuobjdump or find_cuobjdump()))


@functools.lru_cache(maxsize=4)
def _report(library: str, mtime_ns: int, size: int, tool: str) -> tuple[Kernel, ...]:
    # cuobjdump -sass runs nvdisasm, which it looks for on PATH or at NVDISASM_PATH
    env = dict(os.environ, NVDISASM_PATH=os.path.dirname(_find_tool("nvdisasm")))
    done = subprocess.run([tool, "-sass", library], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} -sass {library} failed: {done.stderr.strip()}")
    text = done.stdout
    return tuple(analyze(k) for k in parse_sass(text))


def to_dict(k: Kernel) -> dict:
    """One kernel's figures, for --json."""
    from ._info import _readable_kernel

    return {
        "kernel": _readable_kernel(k.name),
        "mangled": k.name,
        "arch": k.arch,
        "main_path_instructions": k.path_length,
        "longest_path_instructions": k.longest_path_length,
        "tensor_cycles": k.tensor_cycles,
        "smem_cycles": k.smem_cycles,
        "bound": k.bound,
        "longest_path_bound": k.longest_bound,
        "inner_loops": k.inner_loops,
        "inner_loops_unknown_trips": k.unknown_trips,
        "counts": k.counts,
        "opcodes": k.opcodes,
    }


def format_report(kernels: list[Kernel]) -> str:
    """A Markdown table, one row per (kernel, architecture)."""
    from ._info import _readable_kernel

    head = (
        "| arch | kernel | main path | HMMA | tensor cycles | smem cycles | bound "
        "| longest path | its bound | inner loops | LDSM | LDGSTS | LDS/STS | LDG/STG | int div "
        "| MUFU | BAR | IMAD.WIDE | local |"
    )
    lines = [head, "| --- | --- |" + " ---: |" * 18]
    for k in sorted(kernels, key=lambda k: (_readable_kernel(k.name), k.arch)):
        c = k.counts or dict.fromkeys(CLASSES, 0)
        bound = "-" if k.bound is None else f"{100 * k.bound:.1f}%"
        longest = "-" if k.longest_bound is None else f"{100 * k.longest_bound:.1f}%"
        inner = f"{k.inner_loops} ({k.unknown_trips} once)" if k.unknown_trips else k.inner_loops
        lines.append(
            f"| {k.arch} | `{_readable_kernel(k.name)}` | {k.path_length} | {c['hmma']} "
            f"| {k.tensor_cycles:.0f} | {k.smem_cycles:.0f} | {bound} "
            f"| {k.longest_path_length} | {longest} | {inner} | {c['ldsm']} "
            f"| {c['ldgsts']} | {c['lds']}/{c['sts']} | {c['ldg']}/{c['stg']} | {c['int_div']} "
            f"| {c['mufu']} | {c['bar']} | {c['imad_wide']} | {c['local']} |"
        )
    return "\n".join(lines)


def format_opcodes(kernels: list[Kernel]) -> str:
    """Each kernel's main path by opcode, most issued first: where its instructions go."""
    from ._info import _readable_kernel

    out = []
    for k in sorted(kernels, key=lambda k: (_readable_kernel(k.name), k.arch)):
        ops = sorted(k.opcodes.items(), key=lambda kv: (-kv[1], kv[0]))
        out.append(f"{k.arch} {_readable_kernel(k.name)}: {k.path_length} on the main path")
        out.append("  " + ", ".join(f"{op} {n}" for op, n in ops))
    return "\n".join(out)
