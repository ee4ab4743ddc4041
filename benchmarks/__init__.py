"""Benchmarks of CrossPool-JAX (timed work lives here, never in tests)."""
