"""lpt-serve: many text classifiers on one frozen encoder, each task a tiny late-prompt adapter.

Layers, each importing only the ones below it (see docs/architecture.md):

- `lpt_serve.model`: the backbone with its split forward, generators, heads, the adapter format, the mixed pass.
- `lpt_serve.serving`: the store, the registry, the micro-batcher, metrics and the `Service` (texts in,
  predictions out).
- `lpt_serve.api`: the HTTP edge (settings, app factory, routes, error table, dashboard, logs, `lpt-serve`).
- `lpt_serve.training`: the trainer, the datasets and the `lpt` CLI, on the model core.

`lpt_serve.format`, `lpt_serve.errors` and `lpt_serve.paths` are leaves that every layer may use.
"""

__version__ = "0.1.0"
