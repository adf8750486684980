"""Command line: `python -m tokenmix info | cuda-resources | sass-report | ptx-check`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmix", description="tokenmix utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="version, torch version and available backends")
    p_info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    sub.add_parser(
        "cuda-resources",
        help="registers, shared memory and spills of the shipped CUDA kernels (ptxas report)",
    )
    p_sass = sub.add_parser(
        "sass-report",
        help="a static model of the CUDA kernels' main loops (instruction classes, tensor-pipe "
        "bound; needs cuobjdump)",
    )
    p_sass.add_argument("--library", help="the library to read (default: the installed _C.so)")
    p_sass.add_argument("--kernel", help="only kernels whose readable name matches this regex")
    p_sass.add_argument("--arch", help="only this architecture (sm_80, sm_90, ...)")
    p_sass.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p_sass.add_argument(
        "--opcodes", action="store_true", help="list each main path's instructions by opcode"
    )
    p_ptx = sub.add_parser(
        "ptx-check",
        help="assemble the library's embedded PTX for other architectures or with another ptxas "
        "(registers, spills, errors; needs cuobjdump)",
    )
    p_ptx.add_argument("--library", help="the library to read (default: the installed _C.so)")
    p_ptx.add_argument(
        "--arch", nargs="+", default=["100", "120"], help="architectures (default: 100 120)"
    )
    p_ptx.add_argument("--ptxas", help="the ptxas to run (default: CUDA 13's)")
    p_ptx.add_argument("--cuda", type=int, help="use the ptxas of this CUDA major release (12)")
    p_ptx.add_argument("--ptx-version", help="rewrite the PTX's .version first (8.8)")
    p_ptx.add_argument("--kernel", help="only modules defining a kernel matching this regex")
    p_ptx.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    if args.command == "sass-report":
        return _sass_report(args)
    if args.command == "ptx-check":
        return _ptx_check(args)
    if args.command == "cuda-resources":
        from tokenmix._info import cuda_resource_usage, format_cuda_resources

        rows = cuda_resource_usage()
        if not rows:
            print("this build has no CUDA kernels (see `python -m tokenmix info`)", file=sys.stderr)
            return 1
        print(format_cuda_resources(rows))
    elif args.command == "info":
        from tokenmix._info import format_info, info

        data = info()
        print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0


def _sass_report(args) -> int:
    import re

    from tokenmix._info import _readable_kernel
    from tokenmix._sass import format_opcodes, format_report, sass_report, to_dict

    try:
        kernels = sass_report(args.library)
    except FileNotFoundError as e:
        print(f"tokenmix sass-report: {e}", file=sys.stderr)
        return 1
    if args.kernel:
        kernels = [k for k in kernels if re.search(args.kernel, _readable_kernel(k.name))]
    if args.arch:
        kernels = [k for k in kernels if k.arch == args.arch]
    if not kernels:
        print("tokenmix sass-report: no CUDA kernel matched (see `python -m tokenmix info`)",
              file=sys.stderr)  # fmt: skip
        return 1
    if args.json:
        print(json.dumps([to_dict(k) for k in kernels], indent=2))
    else:
        print(format_opcodes(kernels) if args.opcodes else format_report(kernels))
    return 0


def _ptx_check(args) -> int:
    import dataclasses
    import re

    from tokenmix import _ptx_check as pc

    def usage(message: str) -> int:
        print(f"tokenmix ptx-check: {message}", file=sys.stderr)
        return 2

    try:
        archs = [int(a.removeprefix("sm_")) for a in args.arch]
    except ValueError:
        return usage(f"--arch takes numbers such as 100, got {args.arch}")
    if args.ptx_version is not None and not re.fullmatch(r"\d+\.\d+", args.ptx_version):
        return usage(f"--ptx-version takes an ISA version such as 8.5, got {args.ptx_version!r}")
    try:
        re.compile(args.kernel or "")
    except re.error as e:
        return usage(f"--kernel must be a regular expression, got {args.kernel!r}: {e}")
    try:
        ptxas = args.ptxas or pc.find_ptxas(args.cuda or 13)
        files = pc.extract_ptx(args.library)
        checks = []
        for arch in archs:
            print(f"tokenmix ptx-check: sm_{arch} ...", file=sys.stderr, flush=True)
            checks.append(pc.check(arch, ptxas, files, args.ptx_version, args.kernel))
    except (OSError, RuntimeError, ValueError) as e:
        print(f"tokenmix ptx-check: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
    else:
        print(pc.format_checks(checks))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
