"""One runtime per target: a `generate.Runner` subclass with `from_bundle(bundle)` (see pipeline.py)."""
