"""The vector UnHype reads in Forge, through Forge's real text engines, is the one the trainer
computes (unhype.embedding) for the same text and weights: SD1, SD2, SDXL and FLUX's CLIP-L, with
emphasis, escaped brackets, BREAK and CLIP skip. Needs ``FORGE_PATH`` (a Forge checkout) and a
transformers that Forge's engine runs on (before 5.6; DEVELOPERS.md says how to run it);
skipped otherwise, with the reason."""

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
    not FORGE or not (Path(FORGE) / "backend" / "text_processing" / "classic_engine.py").exists()
    or not (Path(FORGE) / "backend" / "huggingface").is_dir(),
    reason="FORGE_PATH (a Forge checkout with backend/huggingface) not set")


@pytest.fixture(scope="module")
def probe():
    run = subprocess.run([sys.executable, str(HERE / "forge_engine_probe.py")],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = run.stdout.splitlines()
    skip = [line for line in lines if line.startswith("SKIP ")]
    if skip:
        pytest.skip(skip[0][5:])
    result = [line for line in lines if line.startswith("RESULT ")]
    assert run.returncode == 0 and result, run.stdout[-2000:] + run.stderr[-4000:]
    return json.loads(result[0][7:])


@pytest.mark.parametrize("family", ["sd1", "sd2", "flux"])
def test_forge_engine_gives_the_trained_vector(probe, family):
    got = probe[family]
    # a plain prompt, emphasis, escaped brackets, BREAK: the trained vector, exactly
    assert max(got["per_prompt"][:4]) <= 1e-5 * got["scale"]
    # the long prompt's own vector is Forge's first chunk (cut at a comma), not the trainer's
    # 77-token truncation; the hosts read its windows too (unhype.prompt_windows)
    assert got["per_prompt"][4] > 1e-3
    # the emphasis syntax read as words would be another vector: the check can tell
    assert got["emphasis_as_words"] > 0.1 * got["scale"]


@pytest.mark.parametrize("family", ["sd1", "sd2", "flux"])
def test_clip_skip_leaves_the_vector_alone(probe, family):
    got = probe[family]
    assert got["clip_skip_2"] <= max(got["per_prompt"]) + 1e-6


def test_forge_flux_conditioning_vector(probe):
    # sampling reads the vector of Forge's own FLUX conditioning, of the raw prompts
    assert probe["flux"]["cond_vector"] <= 1e-5 * probe["flux"]["scale"]


def test_forge_sdxl_conditioning_vector(probe):
    got = probe["sdxl"]
    # Forge's own SDXL conditioning (its get_learned_conditioning, bigG projected): the
    # trained vector for a plain prompt, emphasis and escaped brackets
    assert max(got["per_prompt"][:3]) <= 1e-5 * got["scale"]
    # BREAK ends SDXL's first chunk, whose pooled output is the vector; the extension also
    # reads such a prompt whole (session.py) and keeps the stronger update
    assert got["per_prompt"][3] > 1e-3
