#!/usr/bin/env bash
# Loads an installed tokenmix's libraries, with every symbol bound (RTLD_NOW), next to the same
# environment's torch in a Debian 11 root: glibc 2.31, older than glibc 2.34, which moved
# libpthread, libdl and librt into libc under new symbol versions (docs/wheels.md).
#
#   bash tools/check_old_glibc.sh VENV ROOTFS
#
# ROOTFS is made with debootstrap on first use (about 1 minute, from deb.debian.org) and kept;
# debootstrap itself is installed from Debian's packages when missing. Needs root (apt-get,
# debootstrap, chroot, a bind mount): without it the check says SKIPPED, or fails when
# TOKENMIX_REQUIRE_OLD_GLIBC_CHECK=1 (as .ci/run sets).
#
# What it proves: every symbol the libraries need resolves on glibc 2.31 with libpthread, libdl
# and librt separate (the GLIBC_2.34 and GLIBC_2.32 wraps). Debian 11 has glibc 2.31 and gcc 10's
# libstdc++, so the exp/exp2/log2 (GLIBC_2.29) and GLIBCXX_3.4.26 wraps are checked only
# statically, against the manylinux_2_28 policy, by tests/test_portable_library.py.
set -euo pipefail
venv=$(readlink -f "$1")
rootfs=$2
say() { echo "[old-glibc $(date +%H:%M:%S)] $*"; }
skip() {
  if [[ "${TOKENMIX_REQUIRE_OLD_GLIBC_CHECK:-0}" == 1 ]]; then
    say "FAILED: $*"
    exit 1
  fi
  say "SKIPPED: $*"
  exit 0
}
[[ $EUID -eq 0 ]] || skip "the Debian 11 load check needs root"
if ! command -v debootstrap > /dev/null; then
  say "installing debootstrap (Debian package)"
  apt-get install -y -q debootstrap > /dev/null 2>&1 || skip "could not install debootstrap"
fi
if [[ ! -x "$rootfs/usr/bin/python3" ]]; then
  say "debootstrap Debian 11 (bullseye, glibc 2.31) into $rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3 bullseye "$rootfs" \
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
