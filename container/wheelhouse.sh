#!/usr/bin/env bash
# Download every wheel the image needs into a wheelhouse on the host (the one step that needs PyPI),
# so that `podman build` installs with `pip --no-index --find-links` and needs no network.
# Usage: container/wheelhouse.sh SRC_DIR OUT_DIR [EXTRAS]   (EXTRAS: "" for CPU, "gpu" for the GPU variant)
# --isolated: ignore this host's pip.conf / PIP_* (local mirrors, find-links, constraints) and take
# the files from PyPI itself, as a machine elsewhere would.
set -euo pipefail
src="$1"; out="$2"; extras="${3:-}"
mkdir -p "$out"
stamp="$(cat "$src/requirements.lock" "$0" | sha256sum | cut -c1-16)${extras:+-$extras}"
if [ "$(cat "$out/.stamp" 2>/dev/null)" = "$stamp" ]; then echo "$out: up to date"; exit 0; fi
# the lock (exact versions, dev tools included, as `make setup` installs), the lock's transitive
# deps that pip freeze leaves out (wheel, ...), and the build backend of pyproject.toml for the
# project's own editable install. The platform is this host's: x86_64, CPython 3.11, glibc 2.36,
# the same as debian:bookworm and python:3.11-slim-bookworm.
reqs=(-r "$src/requirements.lock" "setuptools==${SETUPTOOLS:-84.2.1}" "pip==${PIP:-26.3}")
if [ -n "$extras" ]; then
  # tensorflow[and-cuda]: the lock does not pin the nvidia-* wheels; tensorflow's own extra does
  # (ranges: nvidia-cublas-cu12<13,>=12.5.3.2 ...); a requirements-gpu.lock in the project pins them
  reqs+=(-c "$src/requirements.lock" "tensorflow[$([ "$extras" = gpu ] && echo and-cuda || echo "$extras")]")
  [ -f "$src/requirements-gpu.lock" ] && reqs+=(-c "$src/requirements-gpu.lock")
fi
# Environment markers are evaluated by the interpreter that runs `pip download`, and pip's
# --python-version does not change python_full_version: redis needs async-timeout on Python
# < 3.11.3 only. So download once per interpreter the images may have, into one wheelhouse (pip
# install takes only what its own interpreter needs from it): PYS, by default this host's python3
# (3.11.7, like python:3.11-slim-bookworm's 3.11.x >= 3.11.3) and Debian bookworm's /usr/bin/python3.11
# (3.11.2, the debootstrap base's).
PYS="${PYS:-python3 $( [ -x /usr/bin/python3.11 ] && echo /usr/bin/python3.11 )}"
tools="$(mktemp -d)"; trap 'rm -rf "$tools"' EXIT
shopt -s nullglob
for py in $PYS; do
  "$py" -m venv "$tools/venv" && "$tools/venv/bin/pip" --isolated install --quiet "pip==${PIP:-26.3}"
  echo "== $("$tools/venv/bin/python" -VV)"
  "$tools/venv/bin/pip" --isolated download --prefer-binary --find-links "$out" --dest "$out" "${reqs[@]}"
  # a few pins exist only as sdists (antlr4-python3-runtime 4.9.3, from hydra, from dvc): build
  # their wheels here, so that the image build only unpacks wheels and needs no build backend
  for sd in "$out"/*.tar.gz "$out"/*.zip; do
    "$tools/venv/bin/pip" --isolated wheel --no-deps --wheel-dir "$out" "$sd" && rm "$sd"
  done
  rm -rf "$tools/venv"
done
# what the wheelhouse pins (for the GPU variant: the nvidia-* versions of today, unless a gpu lock)
(cd "$out" && ls *.whl | sed -E 's/^([^-]+)-([^-]+)-.*/\1==\2/' | sort -u) > "$out/resolved.txt"
echo "$stamp" > "$out/.stamp"
ls "$out" | wc -l; du -sh "$out"
