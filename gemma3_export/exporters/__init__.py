"""One exporter module per target, each with `export(model, folder, spec, log) -> dict` (see pipeline.py)."""
