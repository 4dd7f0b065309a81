#!/usr/bin/env bash
# Offline base image: a minimal Debian bookworm rootfs from the Debian mirror (debootstrap),
# imported into podman as cifarflow-base:bookworm. Needs root, debootstrap, podman.
# Usage: container/make-base.sh [rootfs-dir]   (MIRROR=... to override the apt mirror); make image runs it
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/podman/containers.conf}"
export CONTAINERS_STORAGE_CONF="${CONTAINERS_STORAGE_CONF:-$here/podman/storage.conf}"
rootfs="${1:-$here/../build/image-base/rootfs}"
# the mirror apt already uses here (deb822 .sources or a classic sources.list)
MIRROR="${MIRROR:-$(grep -hoE '^URIs: *http[^ ]*/debian$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | sed 's/^URIs: *//')}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
TAG="${TAG:-cifarflow-base:bookworm}"
if [ ! -x "$rootfs/usr/bin/python3" ]; then
  rm -rf "$rootfs"
  debootstrap --variant=minbase \
    --include=python3,python3-venv,ca-certificates,git,make \
    bookworm "$rootfs" "$MIRROR"
fi
# updates and security too, as python:3.11-slim-bookworm would have them
cat > "$rootfs/etc/apt/sources.list" <<SRC
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
SRC
# smaller image: no .deb cache, no package lists (an image that needs apt runs apt-get update first)
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
# the same locale setting as the python images
tar --numeric-owner -C "$rootfs" -c . | podman import \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$TAG"
podman image ls "$TAG"
