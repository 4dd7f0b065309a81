#!/usr/bin/env bash
# `make image-check`: the smoke pipeline inside cifarflow:cpu with no network, in a workspace made as
# a cluster node makes it (a git clone of the project's remote at HEAD), and the same pipeline on this
# host in a clone of the same commit; their exports must hold the same weights (the model card's
# served weights digest) and every output verify-repro compares must be the same bytes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"; project="$(cd "$here/.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/podman/containers.conf}"
export CONTAINERS_STORAGE_CONF="${CONTAINERS_STORAGE_CONF:-$here/podman/storage.conf}"
IMAGE="${IMAGE:-cifarflow}:cpu"
BIN="${BIN:-$project/.venv/bin}"
commit="$(git -C "$project" rev-parse HEAD)"
work="$project/build/image-check"; rm -rf "$work"; mkdir -p "$work/out"
git clone --quiet --bare "$project" "$work/remote.git"   # what a node clones (read-only in the container)

start=$(date +%s)
podman run --rm --label cifarflow.check=1 --network none \
  -v "$work/remote.git:/remote:ro" -v "$work/out:/out" -e COMMIT="$commit" "$IMAGE" bash -euo pipefail -c '
    git clone --quiet /remote /ws && cd /ws && git checkout --quiet --detach "$COMMIT"
    pip install --quiet --no-deps --no-build-isolation -e .   # the venv runs this commit (offline, seconds)
    make -o /opt/venv/bin/.installed pipeline PROFILE=smoke VENV=/opt/venv   # -o: keep the image'"'"'s venv
    mkdir -p /out/ws && cp -a runs/smoke/data runs/smoke/dvc.lock /out/ws/
  ' > "$work/container.log" 2>&1 || { tail -30 "$work/container.log"; exit 1; }
echo "container: clone + smoke pipeline in $(( $(date +%s) - start )) s (log: $work/container.log)"

start=$(date +%s)
git clone --quiet "$project" "$work/host" && git -C "$work/host" checkout --quiet --detach "$commit"
(cd "$work/host" && make -o "$BIN/.installed" pipeline PROFILE=smoke VENV="$(dirname "$BIN")") > "$work/host.log" 2>&1 \
  || { tail -30 "$work/host.log"; exit 1; }
echo "host: smoke pipeline in $(( $(date +%s) - start )) s (log: $work/host.log)"

"$BIN/python" - "$work/host/runs/smoke" "$work/out/ws" <<'PY'
import json, sys
from pathlib import Path
from cifarflow.verify import Report, compare
host, container = Path(sys.argv[1]), Path(sys.argv[2])
digests = [json.loads((w / "data/export/model_card.json").read_text())["served"]["weights_sha256"] for w in (host, container)]
print(f"served weights sha256: host {digests[0]}, container {digests[1]}")
report = Report()
compare(host, container, report)
print(report.render())
sys.exit(0 if digests[0] == digests[1] and not report.problems else 1)
PY
