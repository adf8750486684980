#!/bin/sh
# CUDA compiler launcher: runs one nvcc command unchanged and keeps its `-Xptxas -v` lines (the
# registers, shared memory, stack and spills of every kernel) in <object>.ptxas, so that the
# resource report is a concatenation instead of a second compile. Everything else nvcc writes
# to stderr (warnings, errors) still reaches the build log.
out=
prev=
for arg in "$@"; do
  if [ "$prev" = "-o" ]; then out=$arg; fi
  prev=$arg
done
if [ -z "$out" ]; then exec "$@"; fi
"$@" 2> "$out.ptxas"
status=$?
grep -v '^ptxas info' "$out.ptxas" >&2
exit $status
