"""A real Kubernetes control plane for tests and `make k8s-up` (see cluster.py)."""
