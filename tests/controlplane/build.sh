#!/usr/bin/env bash
# Build etcd, kube-apiserver, kube-controller-manager and KubeRay's ray-operator from the Go module proxy into a
# per-machine cache outside the checkout (reused by every clone; CI runs in a fresh clone on the same machine).
# Prints the folder that holds the binaries. Skips all of it when $KUBEBUILDER_ASSETS already holds them.
# `build.sh node` builds the node's instead (kubelet, kube-scheduler, kube-proxy, CoreDNS, pause) and prints
# their folder; `build.sh kueue` builds Kueue's manager and prints its folder; `build.sh drop-build-cache` removes
# the Go build cache these builds used (make k8s-binaries runs it last).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${BATCHINFER_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/batchinfer/k8s}
# Go's compiled packages for these builds (~6 GB) go to a cache of their own, which `build.sh drop-build-cache` removes
# once every binary exists (make k8s-binaries does): on a machine whose disk is tight, that is room the node needs.
export GOCACHE="$cache/go-build"
if [[ "${1:-}" == drop-build-cache ]]; then rm -rf "$GOCACHE"; exit 0; fi

need=(etcd kube-apiserver kube-controller-manager ray-operator)
have_all() { local d=$1 b; for b in "${need[@]}"; do [[ -x "$d/$b" ]] || return 1; done; }

if [[ "${1:-}" == kueue ]]; then
  out="$cache/kueue-$KUEUE_VERSION"
  if [[ ! -x "$out/kueue" ]]; then
    echo "kueue build: sigs.k8s.io/kueue $KUEUE_VERSION (minutes when its modules are cold)" >&2
    mkdir -p "$out.part"
    CGO_ENABLED=0 GOFLAGS=-mod=mod GOBIN="$out.part" go install -trimpath "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION" >&2
    mkdir -p "$out" && mv "$out.part/kueue" "$out/kueue" && rmdir "$out.part"
  fi
  echo "$out"; exit 0
fi

if [[ "${1:-}" == node ]]; then
  out="$cache/node-v1-k8s-${KUBERNETES_VERSION}-coredns-${COREDNS_VERSION}"
  need=(kubelet kube-scheduler kube-proxy coredns pause)
  if have_all "$out"; then echo "$out"; exit 0; fi
  mkdir -p "$out" "$cache/work"
  export CGO_ENABLED=0 GOFLAGS=-mod=mod
  w="$cache/work/kubernetes-node-$KUBERNETES_VERSION" staging="v0${KUBERNETES_VERSION#v1}"
  mkdir -p "$w" && cd "$w"
  [[ -f go.mod ]] || go mod init batchinfer.dev/node-build >/dev/null 2>&1
  modfile=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
  args=(-require "k8s.io/kubernetes@$KUBERNETES_VERSION")
  for m in $(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$modfile"); do args+=(-replace "$m=$m@$staging"); done
  go mod edit "${args[@]}"
  printf 'package tools\n\nimport (\n\t_ "k8s.io/kubernetes/cmd/kubelet/app"\n\t_ "k8s.io/kubernetes/cmd/kube-scheduler/app"\n\t_ "k8s.io/kubernetes/cmd/kube-proxy/app"\n)\n' > tools.go
  echo "node build: resolving k8s.io/kubernetes $KUBERNETES_VERSION" >&2; go mod tidy >&2
  minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}; v=k8s.io/component-base/version
  ldflags="-X $v.gitVersion=$KUBERNETES_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
  for c in kubelet kube-scheduler kube-proxy; do
    [[ -x "$out/$c" ]] && continue
    echo "node build: $c" >&2; go build -trimpath -ldflags "$ldflags" -o "$out/$c" "k8s.io/kubernetes/cmd/$c" >&2
  done
  if [[ ! -x "$out/coredns" ]]; then
    echo "node build: coredns $COREDNS_VERSION (minutes when its modules are cold)" >&2
    GOBIN="$cache/work/coredns-$COREDNS_VERSION" go install -trimpath "github.com/coredns/coredns@$COREDNS_VERSION" >&2
    cp "$cache/work/coredns-$COREDNS_VERSION/coredns" "$out/coredns"
  fi
  (cd "$here/pause" && go build -trimpath -ldflags '-s -w' -o "$out/pause" .) >&2
  have_all "$out"
  echo "$out"; exit 0
fi

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]] && have_all "$KUBEBUILDER_ASSETS"; then
  echo "$KUBEBUILDER_ASSETS"; exit 0
fi
# -v2: the Kubernetes binaries report their version (Helm checks the chart's kubeVersion against it).
out="$cache/bin-v2-k8s-${KUBERNETES_VERSION}-etcd-${ETCD_VERSION}-kuberay-${KUBERAY_VERSION}"
if have_all "$out"; then echo "$out"; exit 0; fi
mkdir -p "$out" "$cache/work"
export CGO_ENABLED=0 GOFLAGS=-mod=mod
log() { echo "control-plane build: $*" >&2; }

# k8s.io/kubernetes replaces its staging modules with local paths, so it cannot be `go install`ed: a wrapper
# module requires it and replaces each staging module by its published v0.<minor>.<patch>.
build_kubernetes() {
  local w="$cache/work/kubernetes-$KUBERNETES_VERSION" staging="v0${KUBERNETES_VERSION#v1}"
  mkdir -p "$w" && cd "$w"
  [[ -f go.mod ]] || go mod init batchinfer.dev/controlplane-build >/dev/null 2>&1
  local modfile; modfile=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
  local args=(-require "k8s.io/kubernetes@$KUBERNETES_VERSION")
  local m
  for m in $(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$modfile"); do
    args+=(-replace "$m=$m@$staging")
  done
  go mod edit "${args[@]}"
  printf 'package tools\n\nimport (\n\t_ "k8s.io/kubernetes/cmd/kube-apiserver/app"\n\t_ "k8s.io/kubernetes/cmd/kube-controller-manager/app"\n)\n' > tools.go
  log "resolving k8s.io/kubernetes $KUBERNETES_VERSION"
  go mod tidy >&2
  local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  local v=k8s.io/component-base/version
  local ldflags="-X $v.gitVersion=$KUBERNETES_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
  log "building kube-apiserver"
  go build -trimpath -ldflags "$ldflags" -o "$out/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver >&2
  log "building kube-controller-manager"
  go build -trimpath -ldflags "$ldflags" -o "$out/kube-controller-manager" k8s.io/kubernetes/cmd/kube-controller-manager >&2
}

build_etcd() {
  local w="$cache/work/etcd-$ETCD_VERSION"
  mkdir -p "$w" && cd "$w"
  [[ -f go.mod ]] || go mod init batchinfer.dev/etcd-build >/dev/null 2>&1
  go mod edit -require "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  printf 'package tools\n\nimport _ "go.etcd.io/etcd/server/v3/etcdmain"\n' > tools.go
  log "resolving etcd $ETCD_VERSION"; go mod tidy >&2
  log "building etcd"; go build -trimpath -o "$out/etcd" go.etcd.io/etcd/server/v3 >&2
}

build_kuberay() {
  local w="$cache/work/kuberay-$KUBERAY_VERSION"
  mkdir -p "$w"
  log "building ray-operator $KUBERAY_VERSION"
  GOBIN="$w" go install -trimpath "github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION" >&2
  cp "$w/ray-operator" "$out/ray-operator"
}

[[ -x "$out/etcd" ]] || build_etcd
[[ -x "$out/ray-operator" ]] || build_kuberay
[[ -x "$out/kube-apiserver" && -x "$out/kube-controller-manager" ]] || build_kubernetes
have_all "$out"
echo "$out"
