"""batchinfer operator: BatchInference → KubeRay RayJob. Knows Kubernetes; never imports torch or ray."""
