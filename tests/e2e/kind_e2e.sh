#!/usr/bin/env bash
# Real-cluster end to end: kind + KubeRay 1.7.0 (Helm) + MinIO + both images + the chart + the cluster demo's
# sample and checks (`make cluster-demo` runs the same on this machine's own node, without Docker).
# Needs Docker, kind, and network access; `make kind-e2e` runs it. CI cannot (no Docker engine there).
# KEEP_CLUSTER=1 leaves the cluster up for inspection.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CLUSTER=${CLUSTER:-batchinfer-e2e}
TAG=${TAG:-e2e}
HELM=${HELM:-$ROOT/build/tools/helm}
KUBECTL=${KUBECTL:-$ROOT/build/tools/kubectl}
PY=$ROOT/.venv/bin/python
E2E=$ROOT/tests/e2e
WORK=$ROOT/build/e2e

say() { printf '\n==> %s\n' "$*"; }
need() { command -v "$1" >/dev/null || { echo "kind-e2e needs '$1' on PATH" >&2; exit 2; }; }
need docker; need kind
docker info >/dev/null 2>&1 || { echo "kind-e2e needs a running Docker engine" >&2; exit 2; }

cleanup() {
  [ -n "${PF_PID:-}" ] && kill "$PF_PID" 2>/dev/null || true
  [ "${KEEP_CLUSTER:-0}" = 1 ] || kind delete cluster --name "$CLUSTER"
}
trap cleanup EXIT

say "kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --wait 120s
"$KUBECTL" cluster-info --context "kind-$CLUSTER"

say "KubeRay operator 1.7.0"
"$HELM" repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update
"$HELM" install kuberay-operator kuberay/kuberay-operator --version 1.7.0 \
  --namespace kuberay-system --create-namespace --wait --timeout 5m

say "MinIO"
"$KUBECTL" apply -f "$E2E/minio.yaml"
"$KUBECTL" -n minio rollout status deployment/minio --timeout=5m

say "images (batchinfer-operator:$TAG, batchinfer-job:$TAG) into kind"
docker build -f "$ROOT/operator/Dockerfile" -t "batchinfer-operator:$TAG" "$ROOT"
docker build -f "$ROOT/job_image/Dockerfile" -t "batchinfer-job:$TAG" "$ROOT"
kind load docker-image --name "$CLUSTER" "batchinfer-operator:$TAG" "batchinfer-job:$TAG"

say "batchinfer chart"
"$HELM" install batchinfer "$ROOT/charts/batchinfer" --namespace batchinfer-system --create-namespace \
  --set image.repository=batchinfer-operator --set image.tag="$TAG" --set image.pullPolicy=Never \
  --set jobImage.repository=batchinfer-job --set jobImage.tag="$TAG" --set jobImage.pullPolicy=Never \
  --wait --timeout 5m

say "the demo photos into MinIO (bucket demo), as the one-machine cluster demo uploads them"
"$KUBECTL" -n minio port-forward svc/minio 19000:9000 >/dev/null 2>&1 &
PF_PID=$!
sleep 3
export AWS_ENDPOINT_URL=http://127.0.0.1:19000 AWS_ACCESS_KEY_ID=e2e-access-key \
  AWS_SECRET_ACCESS_KEY=e2e-secret-key AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
"$PY" -c 'import boto3; boto3.client("s3").create_bucket(Bucket="demo")'
"$ROOT/.venv/bin/batchinfer" demo-data s3://demo/images/ --per-photo 12

say "the cluster demo's sample (manifests/samples/local-cluster.yaml), its S3 endpoint pointed at MinIO"
"$KUBECTL" create namespace demo
"$KUBECTL" -n demo create secret generic demo-s3 \
  --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"
sed 's#http://198.18.0.1:9000#http://minio.minio.svc:9000#' "$ROOT/manifests/samples/local-cluster.yaml" \
  | "$KUBECTL" apply -f -
"$KUBECTL" -n demo get bi local-cluster -w &
WATCH_PID=$!
if ! "$KUBECTL" -n demo wait bi/local-cluster --for=jsonpath='{.status.phase}'=Succeeded --timeout=30m; then
  "$KUBECTL" -n demo describe bi local-cluster; "$KUBECTL" -n demo get rayjobs,pods -o wide
  exit 1
fi
kill "$WATCH_PID" 2>/dev/null || true

say "the predictions, checked as the one-machine demo's test checks them"
mkdir -p "$WORK"
"$ROOT/.venv/bin/batchinfer" results s3://demo/predictions/ | tee "$WORK/results.txt"
grep -q "s3://demo/predictions/: 97 inputs, 96 predicted, 1 error rows" "$WORK/results.txt"
grep -Eq "chelsea +(tabby|tiger cat|Egyptian cat)" "$WORK/results.txt"
say "kind e2e passed"
