#!/usr/bin/env bash
# `make images`: kubeforge:<version> (operator and routers) and kubeforge-replica:<version> (the
# base of actor images) from this checkout; kubeforge-replica:<version>-torch, the same base on
# a Python with torch (images/torch.Dockerfile, built once per torch version); and
# kubeforge-examples:<version>, a replica image built FROM the torch one with examples/ baked
# in, as a user builds theirs (the GRPO and collectives examples need torch).
#
# Public bases (python:3.11-slim-bookworm, rust:1-slim-bookworm) are used when they can be
# pulled. Where no registry answers, the Python base is made from Debian's packages
# (images/local-base.sh, cached as an image) and the wheel is built here with this machine's
# cargo and handed in. The machine's CA bundle reaches pip as a build secret only.
#
# Prints the images and their sizes (stderr); stdout is the docker client to use.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf 'images: %s\n' "$*" >&2; }

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
# One torch for the tests and the images: the `dev` extra's pin.
torch_version=$(python3 -c '
import tomllib
dev = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]
print(next(d.split("==")[1] for d in dev if d.startswith("torch==")))')
docker=$(images/engine.sh start)
export DOCKER_BUILDKIT=1

pullable() {
    "$docker" image inspect "$1" >/dev/null 2>&1 \
        || timeout "${KUBEFORGE_PULL_TIMEOUT:-30}" "$docker" pull -q "$1" >/dev/null 2>&1
}

python_image=${KUBEFORGE_PYTHON_IMAGE:-python:3.11-slim-bookworm}
wheels=build
if ! pullable "$python_image"; then
    local_base=kubeforge-base/python:3.11-bookworm
    log "$python_image cannot be pulled: using $local_base, made from Debian's packages"
    "$docker" image inspect "$local_base" >/dev/null 2>&1 \
        || images/local-base.sh "$docker" "$local_base"
    python_image=$local_base
fi
if ! pullable "${KUBEFORGE_RUST_IMAGE:-rust:1-slim-bookworm}"; then
    log "no Rust image: building the wheel here (dist/) and handing it in"
    rm -f dist/kubeforge-*.whl
    python="${PYTHON:-python3}"
    [ -x .venv/bin/python ] && python=.venv/bin/python
    "$python" -m pip wheel --quiet --no-deps -w dist . >&2
    wheels=context
fi

secret=()
ca=${KUBEFORGE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
[ -s "$ca" ] && secret=(--secret "id=ca,src=$ca")

build() {
    local tag=$1
    shift
    log "building $tag ..."
    "$docker" build --quiet "${secret[@]}" -t "$tag" "$@" >/dev/null
}
build "kubeforge:$version" --build-arg "PYTHON_IMAGE=$python_image" --build-arg "WHEELS=$wheels" .
build "kubeforge-replica:$version" --build-arg "BASE=$python_image" \
    --build-arg "KUBEFORGE_IMAGE=kubeforge:$version" -f replica_image/Dockerfile .
torch_base=kubeforge-base/torch:$torch_version
"$docker" image inspect "$torch_base" >/dev/null 2>&1 \
    || log "$torch_base is not built yet: pip installs torch (about 3 GB to fetch) ..."
build "$torch_base" --build-arg "BASE=$python_image" --build-arg "TORCH_VERSION=$torch_version" \
    -f images/torch.Dockerfile images
build "kubeforge-replica:$version-torch" --build-arg "BASE=$torch_base" \
    --build-arg "KUBEFORGE_IMAGE=kubeforge:$version" -f replica_image/Dockerfile .
build "kubeforge-examples:$version" --build-arg "REPLICA_IMAGE=kubeforge-replica:$version-torch" \
    -f images/examples.Dockerfile .

for image in kubeforge:$version kubeforge-replica:$version kubeforge-replica:$version-torch \
    kubeforge-examples:$version; do
    size=$("$docker" image inspect -f '{{.Size}}' "$image")
    printf '%-36s %6d MB\n' "$image" "$((size / 1000000))" >&2
done
echo "$docker"
