"""Erasure baselines measured in the same harness as UnHype (unhype.evaluation).

ESD-x / ESD-u: static LoRAs trained with the ESD loss (cross-attention / everything else), SPM:
a static rank-1 adapter gated by prompt similarity, UCE: the closed-form edit of the
cross-attention keys and values, and the negative prompt. Each is a `unhype.evaluation.methods.Method`.
"""
