"""Serving: the adapter store, the registry of served tasks, the micro-batcher, metrics, and the `Service` that
turns texts into predictions. Knows nothing of HTTP."""
