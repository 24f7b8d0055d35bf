#!/usr/bin/env bash
# Real-cluster end to end: kind + KubeRay 1.7.0 (Helm) + MinIO + both images + the chart + a sample.
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

say "sample images into MinIO"
mkdir -p "$WORK"
"$ROOT/.venv/bin/batchinfer" demo-data "$WORK/images" --per-photo 10
"$KUBECTL" -n minio port-forward svc/minio 19000:9000 >/dev/null 2>&1 &
PF_PID=$!
sleep 3
export AWS_ENDPOINT_URL=http://127.0.0.1:19000 AWS_ACCESS_KEY_ID=e2e-access-key \
  AWS_SECRET_ACCESS_KEY=e2e-secret-key AWS_DEFAULT_REGION=us-east-1
"$PY" - "$WORK/images" <<'PY'
import sys
from pathlib import Path
import boto3
s3 = boto3.client("s3")
s3.create_bucket(Bucket="e2e")
files = sorted(Path(sys.argv[1]).iterdir())
for path in files:
    s3.upload_file(str(path), "e2e", f"images/{path.name}")
print(f"uploaded {len(files)} files")
PY

say "apply the BatchInference and wait for Succeeded"
"$KUBECTL" create namespace e2e
"$KUBECTL" -n e2e create secret generic minio-credentials \
  --from-literal=AWS_ACCESS_KEY_ID=e2e-access-key --from-literal=AWS_SECRET_ACCESS_KEY=e2e-secret-key
"$KUBECTL" apply -f "$E2E/batchinference.yaml"
"$KUBECTL" -n e2e get bi e2e -w &
WATCH_PID=$!
if ! "$KUBECTL" -n e2e wait bi/e2e --for=jsonpath='{.status.phase}'=Succeeded --timeout=30m; then
  "$KUBECTL" -n e2e describe bi e2e; "$KUBECTL" -n e2e get rayjobs,pods -o wide
  exit 1
fi
kill "$WATCH_PID" 2>/dev/null || true

say "check the predictions in MinIO"
"$PY" - "$WORK/images" <<'PY'
import io, json, sys
from pathlib import Path
import boto3, pyarrow.parquet as pq
s3 = boto3.client("s3")
inputs = {f"s3://e2e/images/{p.name}" for p in Path(sys.argv[1]).iterdir()}
manifest = json.loads(s3.get_object(Bucket="e2e", Key="predictions/_SUCCESS.json")["Body"].read())
rows = []
for shard in manifest["shards"]:
    body = s3.get_object(Bucket="e2e", Key=f"predictions/{shard['file']}")["Body"].read()
    rows += pq.read_table(io.BytesIO(body)).to_pylist()
keys = [r["key"] for r in rows]
assert sorted(keys) == sorted(inputs), "every input exactly once"
assert manifest["counts"]["failed"] == 1, manifest["counts"]  # the corrupt demo file
cats = [r["label"] for r in rows if "/chelsea_" in r["key"]]
assert sum(label in {"tabby", "tiger cat", "Egyptian cat"} for label in cats) >= 0.8 * len(cats), cats
print(f"ok: {len(rows)} rows, {manifest['counts']}")
PY
say "kind e2e passed"
