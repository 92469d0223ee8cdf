#!/usr/bin/env bash
# The offline kit's setup (scripts/offline_kit.sh copies it into the kit as setup.sh). Run from the
# repository's root on the machine with no internet:
#     bash KIT/setup.sh COMMAND [ARGS...]
# installs the kit's wheels into ABLATE_SITE (default /tmp/site) without touching the image's own
# packages, makes the sweeper importable under Hydra's plugin namespace (an editable install would do
# that; this one installs no ablate), puts Fashion-MNIST where torchvision reads it (its checksums are
# checked when it is loaded), then runs COMMAND with ABLATE_SITE and the checkout on PYTHONPATH.
set -euo pipefail
kit=$(cd "$(dirname "$0")" && pwd)
site=${ABLATE_SITE:-/tmp/site}
python=${PYTHON:-python3}
[ -d ablate/sweep/hydra_plugin ] || { echo "setup.sh: run it from ablate's repository root" \
    "(no ablate/sweep/hydra_plugin in $PWD)" >&2; exit 2; }
[ -f "$kit/python-version" ] || { echo "setup.sh: $kit is not a complete kit (its build did not finish):" \
    "build it again with \`make offline-kit\`" >&2; exit 2; }
# before installing anything: the kit's wheels are for one Python, and it holds only what such an
# image lacks, so say what is missing instead of failing in pip or at the first import
"$python" - "$(cat "$kit/python-version")" <<'PY' || exit 2
import sys
from importlib.util import find_spec
built_for, here = sys.argv[1], f"{sys.version_info.major}.{sys.version_info.minor}"
if built_for != here:
    sys.exit(f"setup.sh: this kit holds wheels for Python {built_for}, and {sys.executable} is {here}: "
             f"build one for it with `make offline-kit KIT_PYTHON={here}`")
# what the image must bring (the kit does not hold them): import name -> package
image = {"torch": "torch", "torchvision": "torchvision", "triton": "triton", "timm": "timm",
         "numpy": "numpy", "PIL": "pillow", "pandas": "pandas", "matplotlib": "matplotlib",
         "scipy": "scipy", "yaml": "pyyaml", "tqdm": "tqdm", "pip": "pip"}
missing = [package for module, package in image.items() if find_spec(module) is None]
if missing:
    sys.exit(f"setup.sh: {sys.executable} lacks {', '.join(missing)}, which the kit does not hold (it "
             "holds what an image with PyTorch usually lacks): install them, or install ablate with "
             "`make install` where there is internet")
PY
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$kit"/*.whl
mkdir -p "$site/hydra_plugins"
ln -sfn "$PWD/ablate/sweep/hydra_plugin" "$site/hydra_plugins/ablate_sweeper"
raw=data/FashionMNIST/raw
mkdir -p "$raw"
for gz in "$kit"/fashion-mnist/*.gz; do
    out="$raw/$(basename "$gz" .gz)"
    # through a temporary name: an interrupted setup leaves no truncated file that the next would keep
    [ -f "$out" ] || { gunzip -c "$gz" > "$out.part" && mv "$out.part" "$out"; }
done
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
(($#)) || exit 0
exec "$@"
