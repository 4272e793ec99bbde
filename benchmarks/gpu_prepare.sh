#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what benchmarks/gpu_run.sh needs on a bare GPU machine:
#   DEST/her2st/   the five public HER2+ sections (images, counts, spot selections, 250-gene panel)
#   DEST/wheels/   the runtime packages the GPU image lacks (Python 3.12, x86-64), as wheels:
#                  common/ always; pandas2/ or pandas3/ is installed by the pandas found there
#
#   bash benchmarks/gpu_prepare.sh [DEST]      # DEST defaults to .gpu_data (git-ignored)
#
# Environment: M2OST_DATA (default ../shared/data), M2OST_GPU_WHEELS=0 to copy the data only
# (the CPU test does), PYTHON (default python3; needs pip). Rerunning keeps what is there.
# The device tool carries at most 64 MiB with the repository: the total is printed at the end.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$REPO/.gpu_data}
DATA=${M2OST_DATA:-$REPO/../shared/data}
PY=${PYTHON:-python3}
SRC=$DATA/her2st
SECTIONS="B4 C2 C3 C4 C5"

if [ ! -d "$SRC" ]; then
    echo "gpu_prepare: $SRC not found (set M2OST_DATA to the folder holding her2st/)" >&2
    exit 2
fi
mkdir -p "$DEST/her2st/images/HE" "$DEST/her2st/count-matrices" "$DEST/her2st/spot-selections" \
    "$DEST/her2st/gene-panels"
for s in $SECTIONS; do
    cp -u "$SRC/images/HE/$s.jpg" "$DEST/her2st/images/HE/"
    cp -u "$SRC/count-matrices/$s.tsv.gz" "$DEST/her2st/count-matrices/"
    cp -u "$SRC/spot-selections/${s}_selection.tsv" "$DEST/her2st/spot-selections/"
done
cp -u "$SRC/gene-panels/m2ost_250.txt" "$DEST/her2st/gene-panels/"
chmod -R u+w "$DEST/her2st"

# Versions: the repository's pins (pyproject.toml) where the GPU image lacks the package.
# anndata 0.12.19 declares pandas<3; for an image with pandas 3, anndata 0.13.4 (which needs
# pydantic settings) is brought as well, and gpu_run.py installs the set that fits.
COMMON="imagecodecs==2025.11.11 openslide-bin==4.0.1.2 openslide-python==1.4.7 zarr==3.1.6
numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 array-api-compat==1.16.0
legacy-api-wrap==1.5 natsort==8.4.0 session-info2==0.4.1 scanpy==1.11.5"
PANDAS2="anndata==0.12.19 scverse-misc==0.0.3"
PANDAS3="anndata==0.13.4 scverse-misc==0.1.7 pydantic==2.14.3 pydantic-core==2.50.4
pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5
typing-extensions==4.16.0"

fetch() {  # fetch FOLDER SPEC...: wheels for CPython 3.12 on x86-64 Linux, no dependencies
    local dir=$DEST/wheels/$1
    shift
    mkdir -p "$dir"
    for spec in "$@"; do
        local name=${spec%%==*}
        local norm=${name//-/_}
        if compgen -G "$dir/${norm}-${spec##*==}-*.whl" >/dev/null || \
           compgen -G "$dir/${name}-${spec##*==}-*.whl" >/dev/null; then
            continue
        fi
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux1_x86_64 -d "$dir" "$spec"
    done
}

if [ "${M2OST_GPU_WHEELS:-1}" != 0 ]; then
    # shellcheck disable=SC2086
    fetch common $COMMON
    # shellcheck disable=SC2086
    fetch pandas2 $PANDAS2
    # shellcheck disable=SC2086
    fetch pandas3 $PANDAS3
fi

tracked=$(cd "$REPO" && git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -sb "$DEST" | cut -f1)
total=$((tracked + carried))
echo "gpu_prepare: $DEST holds $((carried / 1048576)) MiB; with the tracked files $((total / 1048576)) MiB" \
     "travel (limit 64 MiB, untracked files of the checkout count too)"
if [ "$total" -gt $((62 * 1048576)) ]; then
    echo "gpu_prepare: WARNING: too close to the 64 MiB the device tool carries" >&2
fi
