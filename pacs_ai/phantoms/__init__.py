"""Synthetic studies with known truth, for demos, tests and benchmarks (never for diagnosis)."""
