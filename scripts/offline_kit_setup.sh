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
"$python" -m pip install -q --no-index --no-deps --upgrade --target "$site" "$kit"/*.whl
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
