#!/usr/bin/env bash
# The README's "With Kueue" steps, verbatim (a test keeps the two the same), on the cluster of `make k8s-up`
# after the cluster demo (the chart installed, the demo photos in s3://demo/images/). Run from the repository root.
set -euo pipefail
source build/k8s/env
export PATH=$PWD/build/tools:$PATH
set -x
kubectl create namespace kueue-demo
kubectl -n kueue-demo create secret generic demo-s3 --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"
kubectl apply --server-side -f manifests/samples/kueue/queues.yaml
kubectl apply -f manifests/samples/kueue/catalog.yaml
kubectl -n kueue-demo wait bi/catalog --for=jsonpath='{.status.phase}'=Running --timeout=5m
kubectl apply -f manifests/samples/kueue/spot-check.yaml
kubectl -n kueue-demo wait bi/spot-check --for=jsonpath='{.status.phase}'=Queued --timeout=1m
kubectl -n kueue-demo get bi -o wide
kubectl -n kueue-demo get workloads
kubectl -n kueue-demo wait bi --all --for=jsonpath='{.status.phase}'=Succeeded --timeout=15m
kubectl -n kueue-demo get bi
kubectl -n kueue-demo get workloads
