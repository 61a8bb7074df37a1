#!/usr/bin/env bash
# A local stand-in for python:3.11-slim-bookworm, made from Debian's packages only (for
# machines that reach Debian's archive but no container registry): debootstrap's minbase of
# bookworm with Debian's CPython 3.11 (the same ABI), pip and `python`, imported as an image.
#
# With `plain` as the third argument, the base holds no Python: a stand-in for
# debian:bookworm-slim (the kind node image and its kube-proxy image start from it).
#
# Usage: images/local-base.sh DOCKER TAG [plain]
set -euo pipefail
docker=$1
tag=$2
include=python3,python3-pip,python-is-python3,ca-certificates,passwd
[ "${3:-}" = plain ] && include=ca-certificates
mirror=${KUBEFORGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { printf 'local-base: %s\n' "$*" >&2; }

if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap ..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -qq debootstrap >/dev/null; }
fi
root=$(mktemp -d -t kubeforge-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
log "debootstrap bookworm (minbase + $include) into $root ..."
debootstrap --variant=minbase --include="$include" \
    bookworm "$root" "$mirror" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/*
# Debian marks its Python as externally managed (PEP 668); in an image, as in the official
# python images, pip installs system-wide.
tar -C "$root" -c . | "$docker" import \
    --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1 LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    - "$tag" >/dev/null
log "made $tag"
