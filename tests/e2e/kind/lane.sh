#!/usr/bin/env bash
# `make e2e-kind`: the e2e tier on a real kubelet. Builds the images (make images) and the
# offline node image (make kind-node-image), creates a one-node kind cluster, gives the node fake
# nvidia.com/gpu capacity, loads the images, installs the chart into a namespace that enforces
# the `restricted` Pod Security Standard, and runs tests/e2e against it. Then it deletes the
# cluster, its docker network and the routes it added, and stops the engine if it started it.
#
# Usage: tests/e2e/kind/lane.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/../../.."
log() { printf 'kind-lane: %s\n' "$*" >&2; }

# shellcheck source=../../../k8s/versions.env
source k8s/versions.env
name=${KIND_CLUSTER_NAME:-kubeforge-e2e}
gpus=${KUBEFORGE_E2E_GPUS:-4}
version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
work=$(mktemp -d -t kubeforge-kind.XXXXXX)
routes=()
own_engine=0
started=$(date +%s)

cleanup() {
    local rc=$?
    log "tearing down ..."
    kind delete cluster --name "$name" >/dev/null 2>&1 || true
    for route in ${routes[@]+"${routes[@]}"}; do ip route del $route 2>/dev/null || true; done
    docker network rm kind >/dev/null 2>&1 || true
    # Nothing of the lane's may outlive it: check, and fail the lane if something did.
    left=$(docker ps -aq --filter "label=io.x-k8s.kind.cluster=$name" 2>/dev/null || true)
    left+=$(docker network ls -q --filter name='^kind$' 2>/dev/null || true)
    left+=$(ip route show 10.244.0.0/16)
    if [ -n "$left" ]; then
        log "ERROR: left behind: $left"
        rc=1
    fi
    (( own_engine )) && images/engine.sh stop
    rm -rf "$work"
    log "done in $(( $(date +%s) - started )) s (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT

own_engine=1
images/engine.sh running && own_engine=0
docker_client=$(images/engine.sh start)
log "building the images ..."
images/build.sh >/dev/null
node_image=$(images/kind-node/build.sh)
bin=$(k8s/build-bin.sh --kind | tail -1)
# kind runs `docker`: the shim first (it replaces --privileged), the engine's client behind it.
export PATH="$PWD/images/kind-node/bin:$bin:$PATH"
export KUBEFORGE_REAL_DOCKER=$docker_client

config=tests/e2e/kind/cluster.yaml
for tag in "$ETCD_VERSION" "$COREDNS_VERSION"; do
    grep -q "imageTag: $tag\$" "$config" || { log "ERROR: $config does not name $tag (k8s/versions.env)"; exit 1; }
done
kubeconfig=$work/kubeconfig
log "creating the cluster ($node_image) ..."
kind delete cluster --name "$name" >/dev/null 2>&1 || true
kind create cluster --name "$name" --image "$node_image" --config "$config" \
    --kubeconfig "$kubeconfig" --wait 180s
export KUBECONFIG=$kubeconfig
node=$(kubectl get nodes -o jsonpath='{.items[0].metadata.name}')
# Extended resources are plain numbers in the node's status; the scheduler accounts for them.
kubectl patch node "$node" --subresource=status --type=json -p \
    "[{\"op\":\"add\",\"path\":\"/status/capacity/nvidia.com~1gpu\",\"value\":\"$gpus\"}]" >/dev/null

# Pods live behind the node's address: route the pod range there, so the tests reach a router
# pod from this machine. (Not the Service range: before kube-proxy has written its rules, a
# pod's packet to a ClusterIP would come back to the node through that route, and the
# connection, tracked un-NATed, would stall; in-cluster clients reach Services from pods.)
node_ip=$(kubectl get node "$node" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
ip route replace 10.244.0.0/16 via "$node_ip"
routes+=("10.244.0.0/16 via $node_ip")

log "loading the images into the node ..."
kind load docker-image --name "$name" \
    "kubeforge:$version" "kubeforge-replica:$version" "kubeforge-examples:$version"
kubectl create namespace kubeforge-system >/dev/null
kubectl label namespace kubeforge-system pod-security.kubernetes.io/enforce=restricted >/dev/null
log "helm install ..."
helm install kubeforge charts/kubeforge -n kubeforge-system --wait --timeout 180s \
    --set image.repository=kubeforge --set "image.tag=$version" --set image.pullPolicy=Never \
    >/dev/null

log "running tests/e2e on kind ..."
KUBEFORGE_E2E_KUBECONFIG=$kubeconfig KUBEFORGE_E2E_OPERATOR=kubeforge-system \
KUBEFORGE_E2E_NODE=$node KUBEFORGE_E2E_REPLICA_IMAGE="kubeforge-examples:$version" \
    .venv/bin/python -m pytest tests/e2e -m "not process_node" "$@"
