"""unhype.probe: a prompt's update measured on the gate floor's scale (the file's
gate_reference), after the floor as the hosts apply it; the nearest concept by direction."""

from dataclasses import replace

import pytest
import torch

from tests.helpers import hypernet_for, tiny_sd_unet
from unhype.fileformat import load_hypernet, save_hypernet, save_with_training
from unhype.probe import layer_norms, probe

SCALE = 6 ** 0.5  # ||dW|| of embedding (1, 0) or (0, 1) in `two_way`


def two_way(emb):
    """A network whose layer "a" grows with the embedding's first entry and "b" with its
    second: ||dW|| = SCALE * |e|, and (1, 0) and (0, 1) point at right angles."""
    n = len(emb)
    return {"a": (emb[:, :1, None].expand(-1, 3, 1).clone(), torch.ones(n, 2, 1)),
            "b": (emb[:, 1:2, None].expand(-1, 3, 1).clone(), torch.ones(n, 2, 1))}


EMB = {"circle": (2.0, 0.0), "square": (0.0, 1.0), "a blue circle": (0.85, 0.0),
       "a faint circle": (0.02, 0.0), "a box": (0.0, 0.7),
       # cosines to circle / square: 0.725 / 0.689 (within 0.05), 0.743 / 0.669 (not)
       "a circle and a square": (1.0, 0.95), "a circle by a square": (1.0, 0.9),
       # 0.447 / 0.894: square on top, circle within nothing
       "a square by a circle": (0.5, 1.0)}


def embed(texts):
    return torch.tensor([EMB[t] for t in texts])


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / "two.safetensors"
    save_hypernet(path, hypernet_for(tiny_sd_unet(), variant="shared", rank=1), "sd1",
                  concepts=[{"target": "circle"}, {"target": "square"}],
                  training={"mode": "direct"})
    return load_hypernet(path)


def with_gate(plain, tmp_path, **training):
    return replace(load_hypernet(save_with_training(plain, tmp_path / "g.safetensors",
                                                    **training)), hypernet=two_way)


def test_relative_is_the_share_of_the_files_gate_reference(plain, tmp_path):
    """The concept word "circle" gets twice the reference; a prompt at 85% of the reference
    fires (it was 0.425 of the bare word's update, under the threshold)."""
    loaded = with_gate(plain, tmp_path, gate_reference=SCALE, gate_floor=0.03)
    blue, word = probe(loaded, embed, ["a blue circle", "circle"], ["circle", "square"])
    assert blue.magnitude == pytest.approx(0.85 * SCALE)
    assert blue.share == pytest.approx(0.85)
    assert blue.nearest.relative == pytest.approx(0.85) and blue.fired == ["circle"]
    assert word.share == pytest.approx(2.0)
    assert blue.as_row()[4] == pytest.approx(0.85) and blue.as_row()[6] == "-"


def test_the_floor_and_saturation_are_applied_before_measuring(plain, tmp_path):
    floored = with_gate(plain, tmp_path, gate_reference=SCALE, gate_floor=0.03)
    (faint,) = probe(floored, embed, ["a faint circle"], ["circle"])
    assert faint.magnitude == 0 and faint.raw == pytest.approx(0.02 * SCALE)
    assert faint.zeroed and faint.fired == []
    assert faint.nearest.concept == "circle"  # the direction of what the network generates
    assert faint.as_row()[6].startswith("zeroed (raw 2.0% of the reference")
    saturated = with_gate(plain, tmp_path, gate_reference=SCALE, gate_floor=0.03,
                          gate_saturate=True)
    (blue,) = probe(saturated, embed, ["a blue circle"], ["circle"])
    assert blue.magnitude == pytest.approx(SCALE) and blue.share == pytest.approx(1.0)
    assert blue.gate_scale == pytest.approx(1 / 0.85)
    assert blue.as_row()[6] == "raised x1.18 (saturated)"


def test_nearest_concept_is_chosen_by_direction_not_by_ratio(plain, tmp_path):
    """"circle" is twice as strong as "square"'s own update, so by ratio it looked nearest to
    the weaker concept; its direction is the circle's."""
    (word,) = probe(two_way, embed, ["circle"], ["circle", "square"])  # no gate_reference
    assert word.nearest.concept == "circle" and word.as_row()[3:6] == ["circle", 1.0, 1.0]
    assert word.fired == ["circle"]
    (box,) = probe(two_way, embed, ["a box"], ["circle", "square"])
    assert box.nearest.concept == "square" and box.nearest.relative == pytest.approx(0.7)
    gated = with_gate(plain, tmp_path, gate_reference=SCALE, gate_floor=0.03)
    (word,) = probe(gated, embed, ["circle"], ["circle", "square"])
    assert word.as_row()[2:5] == ["circle", "circle", 2.0]


def test_per_layer_norms_are_the_dense_updates(plain, tmp_path):
    loaded = with_gate(plain, tmp_path, gate_reference=SCALE, gate_floor=0.03)
    (res,) = probe(loaded, embed, ["a box"], ["circle"], per_layer=True)
    dense = {k: float((b[0] @ a[0].T).norm()) for k, (a, b) in two_way(embed(["a box"])).items()}
    assert res.layers == pytest.approx(dense) and res.layers["a"] == 0
    assert res.as_dict()["layers"] == res.layers
    net = hypernet_for(tiny_sd_unet(), rank=2)
    with torch.no_grad():
        f = net(torch.randn(2, 768))
    got = layer_norms(f)
    for name, (a, b) in f.items():
        assert float(got[name][1]) == pytest.approx(float((b[1] @ a[1].T).norm()), rel=1e-5)


def test_a_prompt_naming_two_concepts_fires_both(plain, tmp_path):
    """The update of "a circle and a square" points between the two: both within the cosine
    margin of the top one (and above 0.5), both above the threshold, so both fire (the old
    probe fired the top one only); 0.074 apart, only the top one fires."""
    loaded = with_gate(plain, tmp_path, gate_reference=SCALE, gate_floor=0.03)
    both, one, other = probe(loaded, embed, ["a circle and a square", "a circle by a square",
                                             "a square by a circle"], ["circle", "square"])
    assert [round(c.cosine, 3) for c in both.concepts] == [0.725, 0.689]
    assert both.fired == ["circle", "square"] and both.as_row()[2] == "circle, square"
    assert both.as_dict()["fires"] == ["circle", "square"]
    assert [c["fires"] for c in both.as_dict()["concepts"]] == [True, True]
    assert one.fired == ["circle"]
    assert other.fired == ["square"] and other.nearest.concept == "square"


def test_each_concept_is_measured_against_its_own_reference(plain, tmp_path):
    """With concept_references, a prompt's share differs per concept: "a blue circle" (0.85 of
    the gate_reference) is only 0.425 of the circle's own median update, so it no longer fires;
    "a box" is 1.4 of the square's own."""
    loaded = with_gate(plain, tmp_path, gate_reference=SCALE * 0.5, gate_floor=0.03,
                       concept_references={"circle": SCALE * 2, "square": SCALE * 0.5})
    blue, box, both = probe(loaded, embed, ["a blue circle", "a box", "a circle and a square"],
                            ["circle", "square"])
    assert [c.relative for c in blue.concepts] == pytest.approx([0.425, 1.7])
    assert [c.reference for c in blue.concepts] == pytest.approx([SCALE * 2, SCALE * 0.5])
    assert blue.fired == [] and blue.as_row()[4] == pytest.approx(0.425)
    assert box.fired == ["square"] and box.as_row()[4] == pytest.approx(1.4)
    assert box.as_dict()["nearest"]["reference"] == pytest.approx(SCALE * 0.5)
    norm = (1.0 ** 2 + 0.95 ** 2) ** 0.5
    assert [c.relative for c in both.concepts] == pytest.approx([norm / 2, norm / 0.5])
    assert both.fired == ["circle", "square"]  # circle: 0.69 of its own reference


def test_a_malformed_concept_reference_falls_back_to_the_gate_reference(plain, tmp_path):
    loaded = with_gate(plain, tmp_path, gate_reference=SCALE, gate_floor=0.03,
                       concept_references={"circle": -1, "square": "x"})
    (blue,) = probe(loaded, embed, ["a blue circle"], ["circle", "square"])
    assert [c.relative for c in blue.concepts] == pytest.approx([0.85, 0.85])
    assert [c.reference for c in blue.concepts] == pytest.approx([SCALE, SCALE])


def test_concepts_are_measured_by_the_files_stored_signatures(tmp_path):
    """A file with concept signatures (training["concept_embeddings"], what the hosts name
    concepts by) is probed against them, not against the concept words' own updates."""
    def wide(texts):  # SD1's 768-d embeddings, of which `two_way` reads the first two
        return torch.nn.functional.pad(embed(texts), (0, 766))

    stored = {"circle": [1.0, 0.2] + [0.0] * 766, "square": [0.0, 1.0] + [0.0] * 766}
    path = tmp_path / "two.safetensors"
    save_hypernet(path, hypernet_for(tiny_sd_unet(), variant="shared", rank=1), "sd1",
                  concepts=[{"target": "circle"}, {"target": "square"}],
                  training={"mode": "direct", "concept_embeddings": stored})
    loaded = replace(load_hypernet(path), hypernet=two_way)
    [blue] = probe(loaded, wide, ["a blue circle"], ["circle", "square"])
    # (0.85, 0) against the stored (1.0, 0.2): cosine 1 / sqrt(1.04); against the word's
    # (2, 0) it would be 1
    assert blue.nearest.concept == "circle"
    assert blue.nearest.cosine == pytest.approx(1.04 ** -0.5)
