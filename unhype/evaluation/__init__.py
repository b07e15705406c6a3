"""Evaluation: erasure metrics (MACE protocol) and the harness behind `unhype eval`."""
