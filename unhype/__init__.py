"""UnHype: CLIP-guided hypernetworks that generate concept-erasing LoRAs per prompt.

The core library (this package) depends on torch and safetensors only at import time;
host adapters (ComfyUI nodes, the A1111/Forge extension) and the trainer build on it.
"""

__version__ = "0.1.0"
