#!/usr/bin/env bash
# Prepares .carry/ (git-ignored) for `python -m benchmarks.gpu_check` on a GPU machine that has no
# network (Python 3.12, torch 2.11, torchvision 0.26, pytorch-lightning 2.6.6, pandas, scipy,
# seaborn; no captum, jsonargparse or jupyter), following shared/tools/prepare-gpu-carry: the
# CIFAR-10 pack, the pure-Python wheels missing there, and optionally the inductor cache parts of an
# earlier run (so that it starts warm). Then prints the size of what is sent (the project's files
# and .carry/, at most 64 MiB) and the command line of each stage (under 2,000 characters), to run
# with carry [".carry"] and a timeout of 600 s.
#
# Usage: benchmarks/gpu_carry.sh [FOLDER_WITH_inductor-cache.tar.gz.part_FILES]
set -euo pipefail
top=$(git rev-parse --show-toplevel); cd "$top"
limit=$((64 * 1024 * 1024))
rm -rf .carry/wheels .carry/warm-cache
mkdir -p .carry/wheels

pack=${RESNET_PROBE_DATA:-../shared/data/cifar10-jpeg.npz}
[ -f "$pack" ] || { echo "gpu_carry: no CIFAR-10 pack at $pack (set RESNET_PROBE_DATA)" >&2; exit 1; }
cmp -s "$pack" .carry/cifar10-jpeg.npz 2>/dev/null || cp "$pack" .carry/cifar10-jpeg.npz

# pins from requirements.txt where it has them; the GPU machine's Python is 3.12
pin() { grep -iE "^$1(\[[a-z,]*\])?==" requirements.txt | sed -E 's/\[[a-z,]*\]//' || echo "$1"; }
log=$(mktemp)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .carry/wheels "$(pin captum)" "$(pin jsonargparse)" docstring-parser==0.18.0 typeshed-client==2.14.0 \
  >"$log" 2>&1 || { cat "$log" >&2; rm -f "$log"; exit 1; }
rm -f "$log"

warm=""
if [ $# -ge 1 ]; then
  ls "$1"/inductor-cache.tar.gz.part* >/dev/null 2>&1 || { echo "gpu_carry: no cache parts in $1" >&2; exit 1; }
  mkdir -p .carry/warm-cache && cp "$1"/inductor-cache.tar.gz.part* .carry/warm-cache/
  warm=" --warm-cache .carry/warm-cache"
fi

tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carry=$(du -sb .carry | cut -f1)
total=$((tree + carry))
awk -v t="$tree" -v c="$carry" 'BEGIN { printf "gpu_carry: sent: project files %.1f MiB + .carry %.1f MiB = %.1f MiB (limit 64 MiB)\n", t / 2^20, c / 2^20, (t + c) / 2^20 }'
du -b .carry/cifar10-jpeg.npz .carry/wheels/* ${warm:+.carry/warm-cache/*} | sed 's/^/  /'
if [ "$total" -gt "$limit" ]; then
  echo "gpu_carry: over 64 MiB: leave out the warm cache or other large files" >&2
  exit 1
fi

setup='python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/wheels/*.whl'
setup+=' && export PYTHONPATH=$PWD:/tmp/site RESNET_PROBE_DATA=$PWD/.carry/cifar10-jpeg.npz PYTHONUNBUFFERED=1'
for stage in train eval; do
  cmd="$setup && python3 -m benchmarks.gpu_check --out \$OUT --stage $stage$warm"
  [ ${#cmd} -lt 2000 ] || { echo "gpu_carry: the $stage command is ${#cmd} characters" >&2; exit 1; }
  echo
  echo "stage $stage (${#cmd} characters; carry [\".carry\"], timeout_s 600):"
  echo "$cmd"
done
