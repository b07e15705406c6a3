"""The extension's layers in Forge's own model classes (backend/nn/unet.py, backend/nn/flux.py;
Forge does not run ldm's UNet): every preset's targets resolve at full size (meta device),
and on tiny random models the hooks equal merging the update into the weights, FLUX's fused
qkv / linear1 rows included, and leave nothing behind. Needs ``FORGE_PATH``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FORGE = os.environ.get("FORGE_PATH")

pytestmark = pytest.mark.skipif(
    not FORGE or not (Path(FORGE) / "backend" / "nn" / "unet.py").exists(),
    reason="FORGE_PATH (a Forge checkout) not set")

PRESET_SIZES = {  # targets per preset (unhype.families)
    "sd1": {"xattn_kv": 32, "xattn_all": 64, "attn_all": 128, "attn_ff": 160},
    "sd2": {"xattn_kv": 32, "xattn_all": 64, "attn_all": 128, "attn_ff": 160},
    "sdxl": {"xattn_kv": 140, "xattn_all": 280, "attn_all": 560, "attn_ff": 700},
    "flux": {"paper": 95, "attn_v_out_all": 114, "attn_all": 266},
}


@pytest.fixture(scope="module")
def probe():
    run = subprocess.run([sys.executable, str(HERE / "forge_model_probe.py")],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and result, run.stdout[-2000:] + run.stderr[-4000:]
    return json.loads(result[0][7:])


@pytest.mark.parametrize("family", sorted(PRESET_SIZES))
def test_every_target_resolves_in_forges_full_size_model(probe, family):
    assert probe["full_size"][family] == PRESET_SIZES[family]


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_hooks_equal_the_merged_update_in_forges_model(probe, family):
    got = probe["tiny"][family]
    assert got["layers"] >= 11
    assert got["effect"] > 1e-2  # the update moves the output ...
    assert got["diff"] <= 1e-3 * got["effect"]  # ... as merging it does
    assert got["restored"] == 0.0  # and the hooks leave the model as it was
