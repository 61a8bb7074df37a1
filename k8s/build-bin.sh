#!/usr/bin/env bash
# Build the pinned Kubernetes control-plane binaries used by the e2e tier
# (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, helm, the
# prometheus that scrapes the e2e cluster, and the cert-manager controller with its CRDs)
# from their Go modules, into a cache outside the repo keyed by all versions:
#
#   ${KUBEFORGE_K8S_CACHE:-$HOME/.cache/kubeforge/k8s}/<k8s>-etcd<etcd>-helm<helm>/bin/
#   e.g. ~/.cache/kubeforge/k8s/v1.36.3-etcd3.6.16-helm3.22.0/bin/
#
# Versions come from k8s/versions.env only. A tool whose binary already exists
# is skipped, so a warm run is a no-op. Progress goes to stderr; the bin dir is
# the last (and only) line on stdout.
#
# Usage: k8s/build-bin.sh [--kind] [--print-dir]
#   --kind        also build the kind lane's tools: kubelet, kubeadm, kube-proxy, kind,
#                 containerd, ctr, crictl, the CNI plugins and CoreDNS (into the same bin dir)
#   --print-dir   print the bin dir and exit (no build, no network)
#
# How: each tool gets its own throwaway wrapper module under
# <cache>/<key>/work/<tool> so the dependency graphs don't fight.
# k8s.io/kubernetes's published go.mod requires its staging modules
# (k8s.io/api, k8s.io/client-go, ...) at v0.0.0 and replaces them with
# ./staging/... paths that the module zip lacks; the wrapper replaces each of
# them with the published k8s.io/X v0.<minor>.<patch>. The list is derived
# from the published go.mod on every build (it changes between releases).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
versions_file="$here/versions.env"

log() { printf 'k8s-bin: %s\n' "$*" >&2; }
die() { printf 'k8s-bin: ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

print_dir=0
with_kind=0
for arg in "$@"; do
    case "$arg" in
        --print-dir) print_dir=1 ;;
        --kind) with_kind=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage; die "unknown argument: $arg" ;;
    esac
done

[[ -r "$versions_file" ]] || die "cannot read $versions_file"
# shellcheck source=versions.env
source "$versions_file"
: "${KUBERNETES_VERSION:?KUBERNETES_VERSION not set in $versions_file}"
: "${ETCD_VERSION:?ETCD_VERSION not set in $versions_file}"
: "${HELM_VERSION:?HELM_VERSION not set in $versions_file}"

[[ "$KUBERNETES_VERSION" =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] \
    || die "KUBERNETES_VERSION must look like v1.N.P, got '$KUBERNETES_VERSION'"
k8s_minor=${BASH_REMATCH[1]}
k8s_patch=${BASH_REMATCH[2]}
staging_version="v0.${k8s_minor}.${k8s_patch}"
[[ "$ETCD_VERSION" =~ ^v3\.[0-9]+\.[0-9]+$ ]] \
    || die "ETCD_VERSION must look like v3.N.P, got '$ETCD_VERSION'"
[[ "$HELM_VERSION" =~ ^v3\.[0-9]+\.[0-9]+$ ]] \
    || die "HELM_VERSION must look like v3.N.P, got '$HELM_VERSION'"

cache_root="${KUBEFORGE_K8S_CACHE:-$HOME/.cache/kubeforge/k8s}"
key="${KUBERNETES_VERSION}-etcd${ETCD_VERSION#v}-helm${HELM_VERSION#v}"
dest="$cache_root/$key"
bin="$dest/bin"
work="$dest/work"

if (( print_dir )); then
    printf '%s\n' "$bin"
    exit 0
fi

kube_tools=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
# The kind lane's Kubernetes binaries, built when --kind is given.
kind_kube_tools=(kubelet kubeadm kube-proxy)
: "${PROMETHEUS_VERSION:?PROMETHEUS_VERSION not set in $versions_file}"
[[ "$PROMETHEUS_VERSION" =~ ^v0\.3([0-9][0-9])\.([0-9]+)$ ]] \
    || die "PROMETHEUS_VERSION must look like v0.3NN.P (Prometheus v3.NN.P), got '$PROMETHEUS_VERSION'"
prometheus_release="3.$((10#${BASH_REMATCH[1]})).${BASH_REMATCH[2]}"
prom_mod=github.com/prometheus/prometheus
# Tools built from one Go module each (name module version package), versioned apart from the
# cache key: prometheus always, the kind lane's with --kind.
: "${CERT_MANAGER_VERSION:?CERT_MANAGER_VERSION not set in $versions_file}"
cm_mod=github.com/cert-manager/cert-manager
module_tools=(
    "prometheus $prom_mod $PROMETHEUS_VERSION $prom_mod/cmd/prometheus"
    "cert-manager-controller $cm_mod $CERT_MANAGER_VERSION $cm_mod/cmd/controller"
)
if (( with_kind )); then
    : "${KIND_VERSION:?}" "${CONTAINERD_VERSION:?}" "${CNI_PLUGINS_VERSION:?}"
    : "${CRI_TOOLS_VERSION:?}" "${COREDNS_VERSION:?}" "${KUBE_NETWORK_POLICIES_VERSION:?}"
    knp_mod=sigs.k8s.io/kube-network-policies
    kube_tools+=("${kind_kube_tools[@]}")
    cd_mod=github.com/containerd/containerd/v2
    cni_mod=github.com/containernetworking/plugins
    module_tools+=(
        "kind sigs.k8s.io/kind $KIND_VERSION sigs.k8s.io/kind"
        "containerd $cd_mod $CONTAINERD_VERSION $cd_mod/cmd/containerd"
        "containerd-shim-runc-v2 $cd_mod $CONTAINERD_VERSION $cd_mod/cmd/containerd-shim-runc-v2"
        "ctr $cd_mod $CONTAINERD_VERSION $cd_mod/cmd/ctr"
        "crictl sigs.k8s.io/cri-tools $CRI_TOOLS_VERSION sigs.k8s.io/cri-tools/cmd/crictl"
        "cni-ptp $cni_mod $CNI_PLUGINS_VERSION $cni_mod/plugins/main/ptp"
        "cni-loopback $cni_mod $CNI_PLUGINS_VERSION $cni_mod/plugins/main/loopback"
        "cni-host-local $cni_mod $CNI_PLUGINS_VERSION $cni_mod/plugins/ipam/host-local"
        "cni-portmap $cni_mod $CNI_PLUGINS_VERSION $cni_mod/plugins/meta/portmap"
        "coredns github.com/coredns/coredns $COREDNS_VERSION github.com/coredns/coredns"
        "kube-network-policies $knp_mod $KUBE_NETWORK_POLICIES_VERSION $knp_mod/cmd/kube-network-policies/standard"
    )
fi
all_tools=(etcd "${kube_tools[@]}" helm)
for spec in "${module_tools[@]}"; do all_tools+=("${spec%% *}"); done

# The lane's tools are versioned apart from the cache key: each records the version it was built
# at, and a changed version in versions.env rebuilds it.
declare -A tool_version=()
for spec in "${module_tools[@]}"; do
    read -r name _ ver _ <<<"$spec"
    tool_version[$name]=$ver
done
have() {
    [[ -x "$bin/$1" ]] || return 1
    [[ -z "${tool_version[$1]:-}" ]] || [[ "$(cat "$bin/.$1.version" 2>/dev/null)" == "${tool_version[$1]}" ]]
}

missing=()
for t in "${all_tools[@]}"; do have "$t" || missing+=("$t"); done
if (( ${#missing[@]} == 0 )); then
    log "all ${#all_tools[@]} binaries present in $bin (warm cache), nothing to build"
    printf '%s\n' "$bin"
    exit 0
fi

command -v go >/dev/null || die "go is not on PATH (needs Go >= the go directive of the pinned modules)"
command -v python3 >/dev/null || die "python3 is not on PATH (used to read go.mod JSON)"

mkdir -p "$bin" "$work"
# Serialise concurrent runs for the same key (e.g. parallel CI jobs).
if command -v flock >/dev/null; then
    exec 9>"$dest/.lock"
    flock 9
fi
cp "$versions_file" "$dest/versions.env"

export CGO_ENABLED=0
export GOWORK=off
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod"
nice_cmd=(nice -n "${KUBEFORGE_BUILD_NICE:-10}")
timings="$dest/build-times.txt"

# Path of the published go.mod of MODULE@VERSION (downloads it if needed).
published_gomod() {
    local mod=$1 ver=$2 json
    json=$(cd "$work" && GOFLAGS= go mod download -json "$mod@$ver" 2>&1) \
        || die "cannot download $mod@$ver from the module proxy: $json"
    python3 -c '
import json, sys
d = json.loads(sys.argv[1])
if d.get("Error"):
    sys.exit("module error: " + d["Error"])
print(d["GoMod"])' "$json" || die "no go.mod for $mod@$ver"
}

# Create a fresh wrapper module DIR that requires MODULE@VERSION and copies the
# published module's go and godebug directives (so runtime defaults match an
# upstream build).
init_wrapper() {
    local dir=$1 mod=$2 ver=$3 gomod=$4 edits
    rm -rf "$dir"
    mkdir -p "$dir"
    (cd "$dir" && go mod init "kubeforge.local/k8s-bin/$(basename "$dir")" >/dev/null 2>&1) \
        || die "go mod init failed in $dir"
    edits=$(go mod edit -json "$gomod" | python3 -c '
import json, sys
d = json.load(sys.stdin)
out = []
if d.get("Go"):
    out.append("-go=" + d["Go"])
for g in d.get("GoDebug") or d.get("Godebug") or []:
    out.append("-godebug=%s=%s" % (g["Key"], g["Value"]))
print("\n".join(out))') || die "cannot parse $gomod"
    local -a args=("-require=$mod@$ver")
    while IFS= read -r e; do [[ -n "$e" ]] && args+=("$e"); done <<<"$edits"
    (cd "$dir" && go mod edit "${args[@]}") || die "go mod edit failed in $dir"
}

# k8s.io/* modules that the published k8s.io/kubernetes go.mod requires at
# v0.0.0 or replaces with a local ./staging path, one per line.
kube_staging_modules() {
    go mod edit -json "$1" | python3 -c '
import json, sys
d = json.load(sys.stdin)
mods = set()
for r in d.get("Require") or []:
    if r["Path"].startswith("k8s.io/") and r["Version"] == "v0.0.0":
        mods.add(r["Path"])
for r in d.get("Replace") or []:
    old, new = r["Old"], r["New"]
    if old["Path"].startswith("k8s.io/") and not new.get("Version") \
            and new["Path"].startswith((".", "/")):
        mods.add(old["Path"])
if not mods:
    sys.exit("no k8s.io staging modules found in go.mod (format changed?)")
print("\n".join(sorted(mods)))'
}

# go get PKGS in wrapper DIR (resolves the graph, fills go.mod/go.sum).
resolve() {
    local dir=$1; shift
    log "resolving modules in $dir ..."
    (cd "$dir" && "${nice_cmd[@]}" go get "$@" >&2) \
        || die "go get $* failed in $dir (see errors above)"
}

# build_tool NAME PKG DIR VERSION LDFLAGS VERSION_CMD EXPECT
#   builds PKG in wrapper DIR to $bin/NAME, then checks that running
#   "NAME VERSION_CMD" prints EXPECT (catches ldflags that silently miss).
build_tool() {
    local name=$1 pkg=$2 dir=$3 ver=$4 ldflags=$5 vercmd=$6 expect=$7
    local tmp="$bin/.$name.tmp.$$" start secs out
    if have "$name"; then
        log "$name $ver already built, skipping"
        return 0
    fi
    log "building $name $ver ..."
    start=$(date +%s)
    if ! (cd "$dir" && "${nice_cmd[@]}" go build -trimpath -ldflags "$ldflags" -o "$tmp" "$pkg"); then
        rm -f "$tmp"
        die "go build of $name ($pkg) failed; wrapper module: $dir"
    fi
    secs=$(( $(date +%s) - start ))
    # shellcheck disable=SC2086 # vercmd is a word list on purpose
    out=$("$tmp" $vercmd 2>&1) || true
    if [[ "$out" != *"$expect"* ]]; then
        rm -f "$tmp"
        die "$name built but '$name $vercmd' does not report $expect: $out"
    fi
    mv -f "$tmp" "$bin/$name"
    printf '%s %s %ss %s\n' "$name" "$ver" "$secs" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$timings"
    log "built $name $ver in ${secs}s"
}

needs_any() { local t; for t in "$@"; do have "$t" || return 0; done; return 1; }

# --- etcd -------------------------------------------------------------------
if needs_any etcd; then
    mod=go.etcd.io/etcd/server/v3
    gomod=$(published_gomod "$mod" "$ETCD_VERSION")
    dir="$work/etcd"
    init_wrapper "$dir" "$mod" "$ETCD_VERSION" "$gomod"
    # etcd's release go.mod replaces its sibling modules (api, client, pkg)
    # with ../ paths but also requires them at the release version, so the
    # wrapper needs no replaces. Guard against a release that requires one
    # at v0.0.0 (would need the kubernetes-style replace treatment).
    if go mod edit -json "$gomod" | python3 -c '
import json, sys
d = json.load(sys.stdin)
bad = [r["Path"] for r in d.get("Require") or []
       if r["Path"].startswith("go.etcd.io/etcd/") and r["Version"].startswith("v0.0.0")]
sys.exit(1 if bad else 0)'; then :; else
        die "$mod@$ETCD_VERSION requires etcd sibling modules at v0.0.0; build-bin.sh needs replaces for them"
    fi
    resolve "$dir" "$mod@$ETCD_VERSION"
    build_tool etcd "$mod" "$dir" "$ETCD_VERSION" "-s -w" \
        "--version" "etcd Version: ${ETCD_VERSION#v}"
fi

# --- kubernetes ---------------------------------------------------------------
if needs_any "${kube_tools[@]}"; then
    mod=k8s.io/kubernetes
    gomod=$(published_gomod "$mod" "$KUBERNETES_VERSION")
    dir="$work/kubernetes"
    init_wrapper "$dir" "$mod" "$KUBERNETES_VERSION" "$gomod"
    staging=$(kube_staging_modules "$gomod") || die "cannot derive staging module list from $gomod"
    replaces=()
    while IFS= read -r m; do
        replaces+=("-replace=$m=$m@$staging_version")
    done <<<"$staging"
    log "pinning ${#replaces[@]} staging modules to $staging_version"
    (cd "$dir" && go mod edit "${replaces[@]}") || die "go mod edit -replace failed in $dir"
    pkgs=()
    for t in "${kube_tools[@]}"; do pkgs+=("$mod/cmd/$t@$KUBERNETES_VERSION"); done
    resolve "$dir" "${pkgs[@]}"
    # Every staging module in the graph must have resolved through a replace.
    unpinned=$(cd "$dir" && go list -m -f '{{if and (eq .Version "v0.0.0") (not .Replace)}}{{.Path}}{{end}}' all) \
        || die "go list -m all failed in $dir"
    [[ -z "$unpinned" ]] || die "modules still at v0.0.0 without a replace: $unpinned"

    ldflags="-s -w"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$k8s_minor -X $p.gitTreeState=clean"
    done
    for t in kube-apiserver kube-controller-manager kube-scheduler; do
        build_tool "$t" "$mod/cmd/$t" "$dir" "$KUBERNETES_VERSION" "$ldflags" \
            "--version" "Kubernetes $KUBERNETES_VERSION"
    done
    build_tool kubectl "$mod/cmd/kubectl" "$dir" "$KUBERNETES_VERSION" "$ldflags" \
        "version --client" "Client Version: $KUBERNETES_VERSION"
    if (( with_kind )); then
        build_tool kubelet "$mod/cmd/kubelet" "$dir" "$KUBERNETES_VERSION" "$ldflags" \
            "--version" "Kubernetes $KUBERNETES_VERSION"
        build_tool kube-proxy "$mod/cmd/kube-proxy" "$dir" "$KUBERNETES_VERSION" "$ldflags" \
            "--version" "Kubernetes $KUBERNETES_VERSION"
        build_tool kubeadm "$mod/cmd/kubeadm" "$dir" "$KUBERNETES_VERSION" "$ldflags" \
            "version -o short" "$KUBERNETES_VERSION"
    fi
fi

# --- prometheus and the kind lane's other tools (one wrapper module per Go module) ---
# Built without cgo, and containerd without the snapshotters that need it (a node uses overlayfs).
for spec in "${module_tools[@]}"; do
    read -r name mod ver pkg <<<"$spec"
    have "$name" && continue
    dir="$work/${mod//\//_}-$ver"
    if [[ ! -f "$dir/go.sum" ]]; then
        init_wrapper "$dir" "$mod" "$ver" "$(published_gomod "$mod" "$ver")"
        resolve "$dir" "$pkg@$ver"
    else  # a wrapper shared with a tool built before: add this package's dependencies
        (cd "$dir" && go get "$pkg@$ver" >/dev/null 2>&1) || resolve "$dir" "$pkg@$ver"
    fi
    ldflags="-s -w"
    tags="no_btrfs,no_devmapper,no_zfs,no_aufs"
    case "$name" in
        prometheus)  # only the Kubernetes discovery; the web UI's assets are not needed
            tags="remove_all_sd,enable_kubernetes_sd"
            ldflags+=" -X github.com/prometheus/common/version.Version=$prometheus_release"
            vercmd=--version expect="version $prometheus_release" ;;
        kind) vercmd=version expect="kind $ver" ;;
        containerd | ctr)
            ldflags+=" -X $mod/version.Version=$ver"
            vercmd=--version expect="$ver" ;;
        crictl)
            ldflags+=" -X sigs.k8s.io/cri-tools/pkg/version.Version=$ver"
            vercmd=--version expect="${ver#v}" ;;
        coredns) vercmd=-version expect="CoreDNS-${ver#v}" ;;
        kube-network-policies) vercmd=--help expect="Usage: kube-network-policies" ;;
        cert-manager-controller) vercmd=--help expect="cert-manager" ;;
        *) vercmd=--version expect="" ;;
    esac
    rm -f "$bin/$name"
    GOFLAGS="$GOFLAGS -tags=$tags" \
        build_tool "$name" "$pkg" "$dir" "$ver" "$ldflags" "$vercmd" "$expect"
    if [[ "$name" == cert-manager-controller ]]; then  # and its CRDs, from the same module
        src=$(cd "$dir" && go list -m -f '{{.Dir}}' "$mod") || die "no module dir for $mod"
        rm -rf "$bin/cert-manager-crds"
        mkdir -p "$bin/cert-manager-crds"
        cp "$src"/deploy/crds/crd-*.yaml "$bin/cert-manager-crds/"
        chmod u+w "$bin"/cert-manager-crds/*
    fi
    echo "$ver" >"$bin/.$name.version"
done

# --- helm ---------------------------------------------------------------------
if needs_any helm; then
    mod=helm.sh/helm/v3
    gomod=$(published_gomod "$mod" "$HELM_VERSION")
    dir="$work/helm"
    init_wrapper "$dir" "$mod" "$HELM_VERSION" "$gomod"
    resolve "$dir" "$mod/cmd/helm@$HELM_VERSION"
    # helm's Makefile stamps the k8s version it was built against (client-go
    # v0.N.P -> 1.N) into lint/chartutil defaults; do the same.
    cg=$(cd "$dir" && go list -m -f '{{.Version}}' k8s.io/client-go) || die "cannot resolve k8s.io/client-go in $dir"
    [[ "$cg" =~ ^v0\.([0-9]+)\. ]] || die "unexpected k8s.io/client-go version '$cg' in helm graph"
    hm=1 hn=${BASH_REMATCH[1]}
    ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
    ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
    ldflags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=$hm -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$hn"
    ldflags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$hm -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$hn"
    build_tool helm "$mod/cmd/helm" "$dir" "$HELM_VERSION" "$ldflags" \
        "version --short" "$HELM_VERSION"
fi

for t in "${all_tools[@]}"; do have "$t" || die "$t missing from $bin after build"; done
log "done: ${#all_tools[@]} binaries in $bin (build times: $timings)"
printf '%s\n' "$bin"
