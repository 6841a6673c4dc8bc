#!/usr/bin/env bash
# Fill benchmarks/wheels/ with what benchmarks/gpu_check.sh installs on a GPU machine without network:
# the peers (Liger-Kernel, Cut Cross-Entropy, at the versions benchmarks/RESULTS.md names) and pytest (with
# pytest-xdist and pytest-timeout, so that the CUDA tests run in four processes) and hypothesis with their
# pure-python dependencies, in case that machine's image lacks them. Run it where
# PyPI is reachable; then carry benchmarks/wheels (ignored by git) to the GPU machine with the checkout.
# Every wheel must be pure Python (py3-none-any), so that it installs on whatever Python that machine has.
#
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEST=benchmarks/wheels
PACKAGES=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 pytest pluggy iniconfig hypothesis sortedcontainers attrs
          pytest-xdist execnet pytest-timeout)
rm -rf "$DEST" && mkdir -p "$DEST"
# Only wheels tagged py3-none-any are taken (the newest release that has one: hypothesis's latest are compiled).
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation py --abi none \
  --platform any -d "$DEST" "${PACKAGES[@]}"
status=0
for wheel in "$DEST"/*; do
  case $wheel in
    *-py3-none-any.whl|*-py2.py3-none-any.whl) ;;
    *) echo "not a pure-Python wheel: $wheel" >&2; status=1 ;;
  esac
done
KIB=$(du -sk "$DEST" | cut -f1)
ls -1 "$DEST"
echo "$DEST: $(ls "$DEST" | wc -l) wheels, $((KIB / 1024)) MiB"
if [ "$KIB" -gt $((32 * 1024)) ]; then  # a run carries at most 64 MiB, the checkout included
  echo "too large to carry beside the checkout" >&2; status=1
fi
exit $status
