"""Concept signatures (unhype.concept_signatures): a prompt's concept named by its update's
direction; saturation to that concept's own reference (unhype.gate_floor); a long prompt's
windows of different concepts combined (unhype.prompt_windows.combined_rows)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from unhype.concept_signatures import ConceptSignatures, names, read_embeddings
from unhype.errors import UnHypeError
from unhype.fileformat import load_hypernet, read_header
from unhype.gate_floor import apply_floor
from unhype.hypernet import delta_norm, delta_weight
from unhype.prompt_windows import combined_rows, stack_rows

IN, OUT = 6, 5


def _direction(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(IN, 1, generator=g), torch.randn(OUT, 1, generator=g)


def factors_of(rows):
    """One layer's rank-1 factors: row i = scale_i * (the direction of seed_i)."""
    a = torch.stack([s * _direction(seed)[0] for seed, s in rows])
    b = torch.stack([_direction(seed)[1] for seed, _ in rows])
    return {"layer": (a, b)}


def signatures(references):
    """Concept k's update: direction seed k at norm 1; its reference references[k]."""
    f = factors_of([(k, 1.0) for k in range(len(references))])
    norms = delta_norm(f)
    f = {n: (a / norms[:, None, None], b) for n, (a, b) in f.items()}
    return ConceptSignatures([f"c{k}" for k in range(len(references))], f, list(references))


def _cosine(f):
    from unhype.hypernet import update_gram

    g = update_gram(f, f)
    return g[0, 1] / (g[0, 0] * g[1, 1]).sqrt()


def norms_of(factors):
    return [float(v) for v in delta_norm(factors)]


def scaled(seed, norm):
    f = factors_of([(seed, 1.0)])
    return norm / float(delta_norm(f)[0])


def test_nearest_names_each_concept_by_direction_and_none_for_others():
    sig = signatures([1.0, 4.0])
    assert abs(float(_cosine(sig.factors))) < 0.3  # the two concepts point apart
    f = factors_of([(0, 0.3), (1, 2.0), (7, 1.0), (0, 0.0)])
    assert names(sig.cosines(f)).tolist() == [0, 1, -1, -1]  # seed 7 points no concept's way
    # halfway between two concepts (cosine ~0.7 with each): no clear concept
    from unhype.prompt_windows import stack_rows

    halves = factors_of([(0, scaled(0, 1.0)), (1, scaled(1, 1.0))])
    between = stack_rows(halves, [[0, 1]])
    assert names(sig.cosines(between)).tolist() == [-1]
    # ... which saturation raises to the smallest reference, as files without signatures do
    assert norms_of(apply_floor(between, 1.0, 0.03, saturate=True, signatures=sig)) == \
        pytest.approx(norms_of(apply_floor(between, 1.0, 0.03, saturate=True)), rel=1e-6)


def test_saturation_blends_to_the_smallest_reference_as_the_concept_grows_unclear():
    """No jump where a prompt stops being clearly one concept: the target falls from the
    concept's own reference (cosine >= 0.8) to the smallest (0.5) linearly."""
    sig = signatures([1.0, 4.0])
    cos = torch.tensor([[0.0, 0.9], [0.0, 0.8], [0.0, 0.65], [0.0, 0.5], [0.0, 0.3],
                        [0.78, 0.8]], dtype=torch.float64)
    targets = sig.saturation_targets(cos, 1.0).tolist()
    # the last: clear enough, but only 0.02 above the next concept (margin 0.05): 0.4 of it
    assert targets == pytest.approx([4.0, 4.0, 2.5, 1.0, 1.0, 1.0 + 0.4 * 3.0])


def test_saturation_raises_a_prompt_to_its_own_concepts_reference():
    sig = signatures([1.0, 4.0])  # gate_reference = 1.0, the smallest
    f = factors_of([(0, scaled(0, 0.5)), (1, scaled(1, 1.5)), (1, scaled(1, 6.0)),
                    (7, scaled(7, 0.5)), (1, scaled(1, 0.01))])
    old = norms_of(apply_floor(f, 1.0, 0.03, saturate=True))
    new = norms_of(apply_floor(f, 1.0, 0.03, saturate=True, signatures=sig))
    # concept 0 to 1.0 either way; concept 1 at 1.5: to its own 4.0 (before: left at 1.5);
    # above its reference: untouched; no concept's: the smallest reference; under the floor: 0
    assert old == pytest.approx([1.0, 1.5, 6.0, 1.0, 0.0], rel=1e-5)
    assert new == pytest.approx([1.0, 4.0, 6.0, 1.0, 0.0], rel=1e-5)
    # without saturation the signatures change nothing
    assert norms_of(apply_floor(f, 1.0, 0.03, signatures=sig)) == \
        pytest.approx(norms_of(apply_floor(f, 1.0, 0.03)), rel=1e-6)


def test_combine_sums_the_windows_of_different_concepts_once_each():
    sig = signatures([1.0, 1.0])
    # prompt 0: itself (concept 0, 1.0), windows: concept 0 again (0.8), concept 1 (0.5),
    # nothing (0); prompt 1: only itself (concept 1)
    f = factors_of([(0, 1.0), (0, 0.8), (1, 0.5), (7, 0.0), (1, 2.0)])
    owner = [0, 0, 0, 0, 1]
    cos = sig.cosines(f)
    assert combined_rows(f, owner, 2, cos) == [[0, 2], [4]]
    out = stack_rows(f, combined_rows(f, owner, 2, cos))
    a, b = out["layer"]
    assert a.shape == (2, IN, 2) and b.shape == (2, OUT, 2)  # rank 1 x 2 windows, padded
    fa, fb = f["layer"]
    assert torch.allclose(delta_weight(a[0], b[0]),
                          delta_weight(fa[0], fb[0]) + delta_weight(fa[2], fb[2]), atol=1e-6)
    assert torch.allclose(delta_weight(a[1], b[1]), delta_weight(fa[4], fb[4]), atol=1e-6)
    # a file without signatures: the strongest reading only, as before
    assert combined_rows(f, owner, 2) == [[0], [4]]
    plain = stack_rows(f, combined_rows(f, owner, 2))
    assert plain["layer"][0].shape == (2, IN, 1)
    assert torch.equal(plain["layer"][0][0], fa[0])


def test_combine_adds_a_named_concept_that_no_picked_reading_points_to():
    sig = signatures([1.0, 1.0])
    # the strongest reading is no concept's: the window of concept 1 is added all the same
    f = factors_of([(7, 2.0), (1, 0.5)])
    assert combined_rows(f, [0, 0], 1, sig.cosines(f)) == [[0, 1]]
    # the strongest points halfway between both concepts (two in one window): a window of
    # either adds nothing, it is erased in part already (no doubling)
    from unhype.prompt_windows import stack_rows

    halves = factors_of([(0, scaled(0, 1.0)), (1, scaled(1, 1.0))])
    between = stack_rows(halves, [[0, 1]])  # rank 2
    single = factors_of([(0, 0.3)])
    rows = {"layer": (torch.cat([between["layer"][0],
                                 torch.nn.functional.pad(single["layer"][0], (0, 1))]),
                      torch.cat([between["layer"][1],
                                 torch.nn.functional.pad(single["layer"][1], (0, 1))]))}
    assert combined_rows(rows, [0, 0], 1, sig.cosines(rows)) == [[0]]


def test_readings_are_ranked_before_saturation_which_makes_them_tie():
    """Saturation raises every reading to the same reference; the strongest is the one the
    network switches on most (`rank_by`), not the last digit of equal norms."""
    sig = signatures([1.0, 1.0])
    f = factors_of([(0, scaled(0, 0.5)), (0, scaled(0, 0.9))])
    applied = apply_floor(f, 1.0, 0.03, saturate=True, signatures=sig)
    assert norms_of(applied) == pytest.approx([1.0, 1.0], rel=1e-5)
    assert combined_rows(applied, [0, 0], 1, sig.cosines(f), rank_by=delta_norm(f)) == [[1]]


def test_read_embeddings_refuses_malformed_tables():
    assert read_embeddings({}, 3) == {}
    good = read_embeddings({"concept_embeddings": {"cat": [0.0, 1.0, 2.5]}}, 3)
    assert good["cat"].tolist() == [0.0, 1.0, 2.5]
    for bad in ({"cat": [0.0, 1.0]}, {"cat": [0.0, float("nan"), 1.0]}, {"cat": "0 1 2"},
                {"cat": [True, 1.0, 2.0]}, {}, [[0.0, 1.0, 2.0]]):
        with pytest.raises(UnHypeError, match="concept_embeddings"):
            read_embeddings({"concept_embeddings": bad}, 3)


def test_a_file_with_malformed_signatures_is_refused_at_load(tmp_path):
    from tests.helpers import hypernet_for, tiny_sd_unet
    from unhype.fileformat import save_hypernet

    net = hypernet_for(tiny_sd_unet())
    dim = net.config.embed_dim
    path = save_hypernet(tmp_path / "h.safetensors", net, "sd1",
                         concepts=[{"target": "cat"}, {"target": "dog"}],
                         training={"concept_embeddings": {"cat": [0.0] * dim,
                                                          "dog": [0.1] * dim}})
    assert load_hypernet(path).signatures.targets == ["cat", "dog"]
    metadata, _ = read_header(path)

    def edited(name, change):
        training = json.loads(metadata["unhype.training"])
        change(training["concept_embeddings"])
        out = tmp_path / name
        save_file(load_file(str(path)), str(out), {**metadata,
                                                   "unhype.training": json.dumps(training)})
        return out

    bad = edited("bad.safetensors", lambda t: t.update(cat=[0.0] * 3))
    with pytest.raises(UnHypeError, match=r"bad.safetensors: .*concept_embeddings\['cat'\]"):
        load_hypernet(bad)
    foreign = edited("foreign.safetensors", lambda t: t.update(horse=[0.2] * dim))
    with pytest.raises(UnHypeError, match=r"names \['horse'\], not among the file's concepts"):
        load_hypernet(foreign)
    one = edited("one.safetensors", lambda t: t.pop("dog"))  # nothing to tell apart
    assert load_hypernet(one).signatures is None


def test_concepts_whose_updates_point_the_same_way_are_named(tmp_path, caplog, capsys):
    """Two concepts of one embedding are never told apart (no margin between their updates):
    the load warns once, `unhype inspect` and the hosts' summary name the pair."""
    from tests.helpers import hypernet_for
    from unhype.cli import main
    from unhype.fileformat import save_hypernet
    from unhype.summary import summary_lines

    assert signatures([1.0, 4.0]).same_way() == []  # seeds 0 and 1 point apart
    net = hypernet_for(None, family="toy", rank=1)
    dim = net.config.embed_dim
    shared, other = torch.randn(dim, generator=torch.Generator().manual_seed(3)), -0.1
    path = save_hypernet(tmp_path / "h.safetensors", net, "toy",
                         concepts=[{"target": t} for t in ("circle", "disk", "square")],
                         training={"concept_embeddings": {"circle": shared.tolist(),
                                                          "disk": shared.tolist(),
                                                          "square": [other] * dim}})
    with caplog.at_level("WARNING", logger="unhype"):
        loaded = load_hypernet(path)
        assert loaded.signatures is loaded.signatures  # made, and warned, once
    (a, b, cosine), = loaded.signatures.same_way()
    assert (a, b) == ("circle", "disk") and cosine == pytest.approx(1.0)
    said = "circle and disk: their updates point the same way (cosine 1.00): prompts of " \
        "either are treated as unnamed"
    assert [r.getMessage() for r in caplog.records] == [f"UnHype: h.safetensors: {said}"]
    assert f"WARNING: {said}" in summary_lines(loaded)
    assert main(["inspect", str(path)]) == 0
    assert f"  warning    {said}" in capsys.readouterr().out.splitlines()
    assert main(["inspect", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["concepts_same_way"] == [{"concepts": ["circle", "disk"],
                                         "cosine": pytest.approx(1.0)}]
