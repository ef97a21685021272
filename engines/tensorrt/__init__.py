"""TensorRT, kept thin: pure pre-build checks, config and profiles; the builder and runner import
`tensorrt` lazily, only when they run, so every CPU path works without it installed.

Modules: `checks` (what TensorRT's parser would reject), `config` (builder flags from the graph),
`profiles` (optimization profiles), `metadata` (the plan's sidecar JSON), `log`, `builder`, `runner`.
"""
