#!/usr/bin/env bash
# The e2e tier against a kind cluster, for machines with a Docker engine (none here: CI uses the
# process-node cluster from devcluster/). Creates the cluster, gives its node fake
# nvidia.com/gpu capacity, builds and loads the images, installs the chart when there is one,
# then runs the same tests/e2e with KUBEFORGE_E2E_KUBECONFIG pointing at the cluster.
set -euo pipefail
cd "$(dirname "$0")/../../.."

name=${KIND_CLUSTER_NAME:-kubeforge-e2e}
gpus=${KUBEFORGE_E2E_GPUS:-4}
kubeconfig=$(mktemp -t kubeforge-kind.XXXXXX)
trap 'kind delete cluster --name "$name" >/dev/null 2>&1 || true; rm -f "$kubeconfig"' EXIT

command -v kind >/dev/null || { echo "kind is not installed" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "no Docker engine" >&2; exit 1; }

kind create cluster --name "$name" --kubeconfig "$kubeconfig" --wait 120s
node=$(kubectl --kubeconfig "$kubeconfig" get nodes -o jsonpath='{.items[0].metadata.name}')
# Extended resources are plain numbers in the node's status; the scheduler accounts for them.
kubectl --kubeconfig "$kubeconfig" patch node "$node" --subresource=status --type=json -p \
  "[{\"op\":\"add\",\"path\":\"/status/capacity/nvidia.com~1gpu\",\"value\":\"$gpus\"}]"

if [ -f Dockerfile ]; then
  docker build -t kubeforge:e2e .
  kind load docker-image kubeforge:e2e --name "$name"
fi
if [ -d replica_image ]; then
  docker build -t kubeforge-replica:e2e --build-arg KUBEFORGE_IMAGE=kubeforge:e2e \
    -f replica_image/Dockerfile .
  kind load docker-image kubeforge-replica:e2e --name "$name"
fi
if [ -d charts/kubeforge ]; then
  helm --kubeconfig "$kubeconfig" install kubeforge charts/kubeforge --wait \
    --set image.repository=kubeforge --set image.tag=e2e --set image.pullPolicy=Never
fi

KUBEFORGE_E2E_KUBECONFIG="$kubeconfig" .venv/bin/python -m pytest tests/e2e "$@"
