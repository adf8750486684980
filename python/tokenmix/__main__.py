"""Command line: `python -m tokenmix info`."""

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
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
