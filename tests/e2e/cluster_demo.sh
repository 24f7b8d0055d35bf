#!/usr/bin/env bash
# `make cluster-demo`: the README's "A real cluster on one machine" steps between `make k8s-up` and
# `make k8s-down`, verbatim (a test keeps the two the same). Run from the repository root after `make k8s-up`.
set -euo pipefail
set -x
source build/k8s/env
export PATH=$PWD/build/tools:$PATH
helm install batchinfer charts/batchinfer --namespace batchinfer-system --create-namespace --set image.repository=batchinfer.local/batchinfer-operator --set image.tag=dev --set image.pullPolicy=Never --set jobImage.repository=batchinfer.local/batchinfer-job --set jobImage.tag=dev --set jobImage.pullPolicy=Never
kubectl -n batchinfer-system rollout status deployment/batchinfer --timeout=3m
.venv/bin/batchinfer demo-data s3://demo/images/ --per-photo 12
kubectl create namespace demo
kubectl -n demo create secret generic demo-s3 --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"
kubectl apply -f manifests/samples/local-cluster.yaml
kubectl -n demo wait bi/local-cluster --for=jsonpath='{.status.phase}'=Succeeded --timeout=15m
kubectl -n demo get bi local-cluster
.venv/bin/batchinfer results s3://demo/predictions/
