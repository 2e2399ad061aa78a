#!/usr/bin/env bash
# Builds the air-gapped base image: Debian bookworm from a Debian mirror (debootstrap, no container
# registry needed) with Python 3.11, venv and the machine's CA certificates, imported into podman.
# docker/Dockerfile and docker/Dockerfile.gpu build FROM it when python:3.11-slim-bookworm cannot be
# pulled (docker/build_image.sh decides).
#   bash docker/airgap_base.sh [IMAGE]     (default localhost/llmops-base:bookworm)
# Environment:
#   DEBIAN_MIRROR   Debian mirror debootstrap and apt inside builds use (default http://deb.debian.org/debian)
#   EXTRA_CA_DIR    folder of extra CA certificates (*.crt) to trust inside the image; default
#                   /usr/local/share/ca-certificates, where Debian keeps a machine's own CAs (a TLS
#                   proxy's CA, say): without it pip inside the build fails TLS.
#   REBUILD=1       build even when the image exists.
# Needs root (debootstrap), podman, debootstrap: `source docker/podman_env.sh` installs them.
set -euo pipefail

IMAGE="${1:-localhost/llmops-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA_DIR="${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"
DOCKER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=/dev/null
source "$DOCKER_DIR/podman_env.sh"

if [ "${REBUILD:-0}" != 1 ] && podman image exists "$IMAGE"; then
  echo "base image $IMAGE exists (REBUILD=1 rebuilds it)"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
start=$SECONDS
echo "debootstrap bookworm from $MIRROR ..."
# minbase: essential packages and apt only; python3-venv brings ensurepip for `python3 -m venv`.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  echo "airgap_base: debootstrap failed" >&2
  exit 1
}
mirror_host="${MIRROR%/debian}"
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $mirror_host/debian-security bookworm-security main
SOURCES
if compgen -G "$CA_DIR/*.crt" >/dev/null; then
  cp "$CA_DIR"/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null
  echo "trusted CA certificates from $CA_DIR: $(cd "$CA_DIR" && ls -- *.crt | tr '\n' ' ')"
fi
# What the image does not need at run time.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
tar -C "$root" --numeric-owner -c . | podman import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap --variant=minbase bookworm + python3, python3-venv, ca-certificates" \
  - "$IMAGE" >/dev/null
echo "built $IMAGE in $((SECONDS - start)) s ($(podman image inspect --format '{{.Size}}' "$IMAGE") bytes)"
