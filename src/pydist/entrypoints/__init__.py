"""Thin entry points, one per process: they wire adapters to use cases and nothing more."""
