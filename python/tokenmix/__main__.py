"""Command line: `python -m tokenmix info | cuda-resources | sass-report`."""

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
    args = parser.parse_args(argv)
    if args.command == "sass-report":
        return _sass_report(args)
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
    from tokenmix._sass import format_report, sass_report, to_dict

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
    print(
        json.dumps([to_dict(k) for k in kernels], indent=2) if args.json else format_report(kernels)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
