"""kopf handlers, one module per watched kind. Thin: parse, render, call `kube`, write status."""
