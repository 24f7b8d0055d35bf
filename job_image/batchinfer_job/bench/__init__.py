"""`batchinfer bench`: batchinfer against a plain PyTorch loop and the seed Ray Data recipe, in one process."""
