"""batchinfer job: the Ray Data inference pipeline. Submodules import ray/torch; this package root does not."""
