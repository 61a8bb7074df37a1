#!/usr/bin/env bash
# `make kind-node-image`: kind's node image for the pinned Kubernetes version, made without a
# registry. `kind build node-image` would pull etcd, CoreDNS, pause, kindnetd and the
# local-path provisioner; here every image the node runs is built from its Go module (or, for
# pause, from pause.c), saved, and preloaded into the node's containerd at its first boot.
# Cached: an image whose label matches the hash of the versions and of this folder is reused.
#
# Prints progress on stderr; stdout is the node image's tag.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=images/kind-node
log() { printf 'kind-node: %s\n' "$*" >&2; }

# shellcheck source=../../k8s/versions.env
source k8s/versions.env
bin=$(k8s/build-bin.sh --kind | tail -1)
docker=$(images/engine.sh start)
export DOCKER_BUILDKIT=1

repo=kubeforge.local/k8s
tag=kubeforge.local/kind-node:$KUBERNETES_VERSION
key=$(cat k8s/versions.env "$here"/Dockerfile "$here"/*.Dockerfile "$here"/pause.c \
      "$here"/build.sh "$here"/files/* | sha256sum | cut -c1-16)
if [ "$("$docker" image inspect -f '{{index .Config.Labels "kubeforge.cache"}}' "$tag" 2>/dev/null)" = "$key" ]; then
    log "$tag is current (cache key $key)"
    echo "$tag"
    exit 0
fi

base=${KUBEFORGE_DEBIAN_IMAGE:-debian:bookworm-slim}
if ! "$docker" image inspect "$base" >/dev/null 2>&1 \
        && ! timeout "${KUBEFORGE_PULL_TIMEOUT:-30}" "$docker" pull -q "$base" >/dev/null 2>&1; then
    local_base=kubeforge-base/debian:bookworm
    log "$base cannot be pulled: using $local_base, made from Debian's packages"
    "$docker" image inspect "$local_base" >/dev/null 2>&1 \
        || images/local-base.sh "$docker" "$local_base" plain
    base=$local_base
fi

ctx=$(mktemp -d -t kubeforge-kind-node.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/bin" "$ctx/cni" "$ctx/files" "$ctx/one"
cp "$bin"/{kubelet,kubeadm,kubectl,containerd,containerd-shim-runc-v2,ctr,crictl} "$ctx/bin/"
cp "$bin/kube-network-policies" "$ctx/bin/"
for plugin in ptp loopback host-local portmap; do cp "$bin/cni-$plugin" "$ctx/cni/$plugin"; done
cp "$here"/Dockerfile "$ctx/"
cp "$here"/files/* "$ctx/files/"
gcc -static -Os -Wall -Wextra -Werror -o "$ctx/pause" "$here/pause.c"

# A one-binary image: the binary in /usr/local/bin of an otherwise empty file system.
single() {
    local image=$1 binary=$2 entrypoint=${3:-}
    rm -rf "$ctx/one" && mkdir -p "$ctx/one/usr/local/bin"
    cp "$binary" "$ctx/one/usr/local/bin/"
    local change=(--change 'ENV PATH=/usr/local/bin')
    [ -n "$entrypoint" ] && change+=(--change "ENTRYPOINT [\"/usr/local/bin/$entrypoint\"]")
    tar -C "$ctx/one" -c . | "$docker" import "${change[@]}" - "$image" >/dev/null
}
images=()
for component in kube-apiserver kube-controller-manager kube-scheduler; do
    images+=("$repo/$component:$KUBERNETES_VERSION")
    single "${images[-1]}" "$bin/$component"
done
images+=("$repo/etcd:$ETCD_VERSION") && single "${images[-1]}" "$bin/etcd"
images+=("$repo/coredns:$COREDNS_VERSION") && single "${images[-1]}" "$bin/coredns" coredns
pause_image=$repo/pause:kubeforge
images+=("$pause_image") && single "$pause_image" "$ctx/pause" pause
images+=("$repo/kube-proxy:$KUBERNETES_VERSION")
cp "$bin/kube-proxy" "$ctx/one/kube-proxy"
"$docker" build --quiet -t "${images[-1]}" --build-arg "BASE=$base" \
    -f "$here/kube-proxy.Dockerfile" "$ctx/one" >/dev/null
log "saving ${#images[@]} images for preloading ..."
"$docker" save -o "$ctx/images.tar" "${images[@]}"
"$docker" rmi "${images[@]}" >/dev/null

log "building $tag ..."
"$docker" build --quiet -t "$tag" --label "kubeforge.cache=$key" --build-arg "BASE=$base" \
    --build-arg "KUBERNETES_VERSION=$KUBERNETES_VERSION" --build-arg "PAUSE_IMAGE=$pause_image" \
    "$ctx" >/dev/null
size=$("$docker" image inspect -f '{{.Size}}' "$tag")
log "$tag: $((size / 1000000)) MB"
echo "$tag"
