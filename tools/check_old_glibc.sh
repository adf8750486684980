#!/usr/bin/env bash
# Loads an installed tokenmix's libraries, with every symbol bound (RTLD_NOW), next to the same
# environment's torch in a Debian 11 root: glibc 2.31, older than glibc 2.34, which moved
# libpthread, libdl and librt into libc under new symbol versions (docs/wheels.md).
#
#   bash tools/check_old_glibc.sh VENV ROOTFS
#
# ROOTFS is made with debootstrap on first use (about 1 minute, from deb.debian.org) and kept.
# Needs root (debootstrap, chroot, a bind mount); says SKIPPED otherwise.
set -euo pipefail
venv=$(readlink -f "$1")
rootfs=$2
say() { echo "[old-glibc $(date +%H:%M:%S)] $*"; }
if [[ $EUID -ne 0 ]] || ! command -v debootstrap > /dev/null; then
  say "SKIPPED: the Debian 11 load check needs root and debootstrap"
  exit 0
fi
if [[ ! -x "$rootfs/usr/bin/python3" ]]; then
  say "debootstrap Debian 11 (bullseye, glibc 2.31) into $rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3-minimal bullseye "$rootfs" \
    http://deb.debian.org/debian > "$rootfs.log" 2>&1 || { tail -20 "$rootfs.log"; exit 1; }
fi
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['platlib'])")
mkdir -p "$rootfs/mnt/site"
mount --bind "$site" "$rootfs/mnt/site"
trap 'umount "$rootfs/mnt/site"' EXIT
chroot "$rootfs" /usr/bin/python3 - <<'PY'
import ctypes
import glob
import os
import platform

print("[old-glibc] libc:", " ".join(platform.libc_ver()))
# torch's libraries first, global, as `import torch` loads them.
ctypes.CDLL("/mnt/site/torch/lib/libtorch_cpu.so", mode=os.RTLD_NOW | os.RTLD_GLOBAL)
libraries = sorted(glob.glob("/mnt/site/tokenmix/*.so"))
assert libraries, "no tokenmix libraries in the environment"
for path in libraries:
    ctypes.CDLL(path, mode=os.RTLD_NOW)  # OSError names any missing symbol version
    print("[old-glibc] loaded with every symbol bound:", os.path.basename(path))
PY
