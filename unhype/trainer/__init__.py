"""`unhype train`: paper-faithful hypernetwork erasure training with a kohya-style CLI.

config (flags + TOML) -> concepts (targets, anchors, templates, retain set) -> backend (the frozen
base model: SD1/SD2/SDXL diffusers or the toy) -> loop (ESD-with-anchor, Hypernet-Fields removal
or direct mode, retention, two Adam optimisers) -> `unhype.fileformat.save_hypernet`.
"""
