"""Data pipelines for crate-fast (installed as ``crate_fast.data``)."""
