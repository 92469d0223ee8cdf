#!/usr/bin/env bash
# Build an offline kit for a GPU machine with no internet whose Python already has PyTorch, Triton,
# timm, pandas, scipy, matplotlib and pytest (a typical GPU image): the wheels of ablate's other
# dependencies for that machine's Python, at the versions this environment was tested with;
# Fashion-MNIST as `make data` checked it (data/FashionMNIST/raw, gzipped); and setup.sh, which
# installs them beside the image's packages and runs a command. On the GPU machine, from the
# repository's root:
#     bash KIT/setup.sh python3 -m ablate.gpu_check
# Usage (after `make install`, from the repository's root): scripts/offline_kit.sh KIT_DIR [PYTHON_VERSION]
# (default 3.12); `make offline-kit` runs it with the venv's Python.
set -euo pipefail
kit=${1:?usage: scripts/offline_kit.sh KIT_DIR [PYTHON_VERSION]}
target_python=${2:-3.12}
raw=data/FashionMNIST/raw
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}

# What such an image lacks; W&B is left out: it is imported only when a run logs to it.
binary=(hydra-core omegaconf hydra-joblib-launcher hydra-submitit-launcher submitit cloudpickle joblib
        pycocotools torchmetrics lightning-utilities)
# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 needs exactly) is published as a source archive only
sdist=(antlr4-python3-runtime)

pinned() {  # name==version as installed here, so the kit holds what the tests passed with
    "$python" - "$@" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"offline_kit: {', '.join(missing)} not installed in {sys.executable}; run `make install` "
             "first (the kit takes the versions installed there)")
PY
}

[[ $target_python =~ ^3\.[0-9]+$ ]] || { echo "offline_kit: the Python version must read like 3.12" \
    "(KIT_PYTHON= in make), got '$target_python'" >&2; exit 2; }
[ -f "$raw/.complete" ] || { echo "offline_kit: no checked Fashion-MNIST in $raw; run \`make data\`" \
    "(or \`make install\`) from the repository's root first" >&2; exit 2; }
wheels=$(pinned "${binary[@]}") && sources=$(pinned "${sdist[@]}") || exit 2
# a kit built before holds other versions, which setup.sh's one `pip install` would take together
mkdir -p "$kit/fashion-mnist"
rm -f "$kit"/*.whl "$kit/python-version"  # written last: a kit that has it is complete
# shellcheck disable=SC2086  # one requirement a line, no spaces in them
if ! { "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$target_python" \
           --dest "$kit" $wheels && "$python" -m pip wheel -q --no-deps --wheel-dir "$kit" $sources; }; then
    echo "offline_kit: pip could not fetch the wheels for Python $target_python (its message is above:" \
         "no package index reachable, or no wheel of that version for that Python)" >&2
    exit 2
fi
echo "$target_python" > "$kit/python-version"
for f in "$raw"/*-ubyte; do gzip -c "$f" > "$kit/fashion-mnist/$(basename "$f").gz"; done
cp "$here/offline_kit_setup.sh" "$kit/setup.sh"
echo "offline kit for Python $target_python in $kit ($(du -sh "$kit" | cut -f1)):" \
     "on the GPU machine, from the repository's root: bash $kit/setup.sh python3 -m ablate.gpu_check"
