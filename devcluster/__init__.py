"""A real Kubernetes control plane for tests, with a node that runs pods as local processes.

Not part of the kubeforge distribution: it is the e2e tier's cluster (DESIGN §6). The
binaries come from `make k8s-bin` (built from their Go modules, cached outside the repo).
"""
