#!/usr/bin/env bash
# `make image` / `make image-gpu`: the build context build/image/ (src/: a git checkout of HEAD;
# wheelhouse/: every wheel, downloaded on the host, the one step that needs PyPI), the base image
# (offline: debootstrap, made once), then `podman build --network none`.
# Usage: container/build.sh cpu|gpu   (BASE=docker.io/library/python:3.11-slim-bookworm where a registry is reachable)
set -euo pipefail
variant="${1:-cpu}"
here="$(cd "$(dirname "$0")" && pwd)"; project="$(cd "$here/.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/podman/containers.conf}"
export CONTAINERS_STORAGE_CONF="${CONTAINERS_STORAGE_CONF:-$here/podman/storage.conf}"
BASE="${BASE:-localhost/cifarflow-base:bookworm}"
IMAGE="${IMAGE:-cifarflow}"
context="$project/build/image"
for tool in podman buildah; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install podman buildah runc debootstrap (as root)" >&2; exit 2; }
done
mkdir -p "$context"
commit="$(git -C "$project" rev-parse HEAD)"
if [ -n "$(git -C "$project" status --porcelain --untracked-files=no)" ]; then
  echo "note: the image holds commit ${commit:0:12}, not your uncommitted changes" >&2
fi
if [ "$(git -C "$context/src" rev-parse HEAD 2>/dev/null)" != "$commit" ]; then
  rm -rf "$context/src"
  git clone --quiet --no-checkout "$project" "$context/src"
  git -C "$context/src" checkout --quiet --detach "$commit"
  git -C "$context/src" remote remove origin   # a host path means nothing inside the image
fi
extras=""; [ "$variant" = gpu ] && extras=gpu
"$here/wheelhouse.sh" "$context/src" "$context/wheelhouse/$variant" $extras
case "$BASE" in
  localhost/cifarflow-base*) podman image exists "$BASE" || TAG="$BASE" "$here/make-base.sh"; network=none ;;
  *) network=host ;;   # a registry base: pulled, and python:slim gets git and make from apt
esac
start=$(date +%s)
podman build --network "$network" --build-arg BASE="$BASE" --build-arg WHEELHOUSE="wheelhouse/$variant" \
  --build-arg EXTRAS="dev${extras:+,$extras}" --label org.opencontainers.image.revision="$commit" \
  -t "$IMAGE:$variant" -f "$here/Containerfile" "$context"
echo "podman build: $(( $(date +%s) - start )) s"
podman image ls "$IMAGE:$variant"
