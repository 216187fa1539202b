"""benchmarks: fidelity and speed against retraining (benchmarks/README.md, docs/method.md#measured-limits)."""
