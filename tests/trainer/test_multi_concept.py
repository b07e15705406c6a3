"""Several concepts in one hypernetwork: per-concept scores and bars, per-concept log and
references, anchors that name another erased concept, the exposure note, composite prompts."""

import json

import numpy as np
import pytest
import torch

from unhype.fileformat import load_hypernet
from unhype.hypernet import delta_norm
from unhype.toy import data
from unhype.trainer import concepts as C
from unhype.trainer import evaluate, loop
from unhype.errors import UnHypeError
from unhype.trainer.config import resolve

from tests.trainer.conftest import fast_options, inline_cfg


def _preds(sets, keep: dict, kind: str) -> np.ndarray:
    """Predictions for `sets[kind]`: shape s judged as itself in the first keep[s] of its rows,
    as 'star' (a retained class) otherwise; every row right when s is not in `keep`."""
    truth = sets[kind][1]
    pred = truth.copy()
    for shape, n in keep.items():
        rows = np.flatnonzero(truth == data.SHAPES.index(shape))
        pred[rows[n:]] = data.SHAPES.index("star")
    return pred


def test_bars_hold_for_the_worst_concept_not_the_pooled_mean():
    # the audit's file: circle keeps 3 of 12 images (25%), square and triangle none, so the
    # pooled Acc_e is 8.3% and the old bar said "erased<=10% ok"
    erased = ["circle", "square", "triangle"]
    sets = evaluate.prompt_sets(erased, per_class=12)
    base = evaluate.scores({k: sets[k][1].copy() for k in sets}, sets)
    after = evaluate.scores({
        "erased": _preds(sets, {"circle": 3, "square": 0, "triangle": 0}, "erased"),
        "synonyms": _preds(sets, {"circle": 0, "square": 0, "triangle": 4}, "synonyms"),
        "others": sets["others"][1].copy()}, sets)
    assert after["acc_e"] == pytest.approx(1 / 12)  # pooled, kept as before
    assert after["acc_g"] == pytest.approx(4 / 36)
    assert after["per_concept"] == {"circle": {"acc_e": 0.25, "acc_g": 0.0},
                                    "square": {"acc_e": 0.0, "acc_g": 0.0},
                                    "triangle": {"acc_e": 0.0, "acc_g": pytest.approx(1 / 3)}}
    assert base["per_concept"]["circle"] == {"acc_e": 1.0, "acc_g": 1.0}
    passes = evaluate.bars(base, after)
    assert passes == {"erased<=10%": False, "others>=90% of base": True,
                      "synonyms<=20%": False}
    on = evaluate.bars_on(after)
    assert on["erased<=10%"] == {"concept": "circle", "value": 0.25}
    assert on["synonyms<=20%"]["concept"] == "triangle"
    text = evaluate.format_metrics({"erased": erased, "per_class": 12, "base": base,
                                    "unhype": {**after, "kept_s": 1.0, "change_s": 0.0},
                                    "passes": passes, "bars_on": on})
    assert "erased<=10% MISSED (worst: circle 25.0%)" in text
    assert "weakest concept: circle (Acc_e 25.0%, pooled 8.3%)" in text
    assert "| UnHype, circle | 25.0% (base 100%)" in text
    assert "; synonyms: triangle (Acc_g 33.3%, pooled 11.1%)" in text
    clean = evaluate.scores({k: _preds(sets, {s: 0 for s in erased}, k) if k != "others"
                             else sets[k][1].copy() for k in sets}, sets)
    evaluate.bars(base, clean)
    text = evaluate.format_metrics({"erased": erased, "per_class": 12, "base": base,
                                    "unhype": {**clean, "kept_s": 1.0, "change_s": 0.0},
                                    "passes": evaluate.bars(base, clean),
                                    "bars_on": evaluate.bars_on(clean)})
    assert "weakest concept: none, every concept at Acc_e 0.0%" in text


def test_one_concept_keeps_its_bars_and_table():
    sets = evaluate.prompt_sets(["circle"], per_class=10)
    base = evaluate.scores({k: sets[k][1].copy() for k in sets}, sets)
    after = evaluate.scores({"erased": _preds(sets, {"circle": 1}, "erased"),
                             "synonyms": _preds(sets, {"circle": 3}, "synonyms"),
                             "others": sets["others"][1].copy()}, sets)
    assert after["per_concept"] == {"circle": {"acc_e": 0.1, "acc_g": 0.3}}
    assert evaluate.bars(base, after) == {"erased<=10%": True, "others>=90% of base": True,
                                          "synonyms<=20%": False}


def _conflict_cfg(entries):
    cfg = resolve({"pretrained_model_name_or_path": "x"})
    cfg.concept_entries = entries
    return cfg


def test_an_anchor_naming_another_erased_concept_is_warned_about(capsys):
    tpl = {"templates": ["a {}"]}
    found = C.resolve_concepts(_conflict_cfg([
        {"target": "circle", "anchor": "a red square", **tpl},
        {"target": "square", "anchor": "triangle", **tpl},  # triangle is not erased: fine
        {"target": "star", "anchor": "two boxes", **tpl},   # a synonym of another concept
        {"target": "cross", "anchor": "", "synonyms": ["box"], **tpl}]))
    assert [c.target for c in found] == ["circle", "square", "star", "cross"]  # not refused
    err = capsys.readouterr().err
    assert err.count("warning") == 2
    assert "concept 'circle' has anchor 'a red square', which names 'square'" in err
    assert "'circle' prompts will be trained to draw 'square'" in err
    assert "concept 'star' has anchor 'two boxes', which names 'box' (a synonym of 'cross')" \
        in err
    assert "'square' has anchor" not in err
    C.resolve_concepts(_conflict_cfg([{"target": "circle", "anchor": "a squared circle",
                                       **tpl}, {"target": "square", **tpl}]))
    assert "warning" not in capsys.readouterr().err  # 'squared' is another word


def test_composite_note_only_where_composites_helped():
    assert "--composite_prompts 15" in C.composite_note(2, "direct", False, 0)
    assert C.composite_note(1, "direct", False, 0) is None
    assert C.composite_note(2, "direct", False, 30) is None
    assert C.composite_note(2, "direct", True, 0) is None  # saturated: already erased
    assert C.composite_note(2, "fields", False, 0) is None


def test_exposure_note():
    assert C.exposure_note(1, 400, 8) is None
    note = C.exposure_note(3, 400, 8, accumulation=2)
    assert "3 concepts share 400 steps x 16 prompts" in note
    assert "~2133 prompt draws" in note and "~133 steps" in note


def test_multi_concept_run_logs_and_stores_each_concept(tiny_sd1, tmp_path, capsys):
    cfg = resolve(fast_options(tiny_sd1, tmp_path, max_train_steps=3, train_batch_size=4,
                               log_every=1))
    cfg.concept_entries = [
        {"target": "dog", "anchor": "cat", "templates": ["a photo of a {}", "a {}"]},
        {"target": "car", "anchor": "a dog on a road", "templates": ["a {}", "a red {}"]}]
    session = loop.prepare(cfg)
    err = capsys.readouterr().err
    assert "concept 'car' has anchor 'a dog on a road', which names 'dog'" in err
    assert "note: 2 concepts share 3 steps x 4 prompts" in err and "~6 prompt draws" in err
    assert "--composite_prompts" not in err  # fields mode: no note (see composite_note)
    assert loop.train(session, progress=False) == 0
    err = capsys.readouterr().err
    records = [json.loads(ln) for ln in (tmp_path / "erase-loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert set(r["concepts"]) == {"dog", "car"}
        assert sum(c["rows"] for c in r["concepts"].values()) == 4  # the whole batch
        for c in r["concepts"].values():
            assert ("esd_T" in c) == (c["rows"] > 0)
    last = records[-1]["concepts"]
    meta = load_hypernet(tmp_path / "erase.safetensors").meta.training
    refs = meta["concept_references"]
    assert set(refs) == {"dog", "car"} and min(refs.values()) == meta["gate_reference"] > 0
    hn, embed = session.hypernet, session.backend.embed
    with torch.no_grad():
        for c in session.concepts:  # 2 prompts each: the log's median is over all of them
            own = float(delta_norm(hn(embed([p for p, _ in c.prompts()]))).median())
            assert refs[c.target] == pytest.approx(own, rel=1e-5)
            assert last[c.target]["delta_target"] == pytest.approx(own, rel=1e-5)
    assert "unhype train: per concept: dog (update" in err and "; weakest: " in err


def test_composite_prompts_pair_each_concept_with_a_retained_prompt():
    concepts = [C.Concept("circle", templates=["a {}", "a red {}"]),
                C.Concept("car", anchor="bus", templates=["a {}"])]
    retained = ["a blue heart", "a tree"]
    items = C.composite_items(concepts, retained, 6, seed=3)
    assert [i for i, _, _ in items] == [0] * 6 + [1] * 6
    joiners = [", ", ", ", " and ", " and ", " next to ", " next to "]
    for j, (index, prompt, anchor) in enumerate(items):
        own = ["a circle", "a red circle"] if index == 0 else ["a car"]
        instead = "" if index == 0 else "a bus"
        pair = prompt.split(joiners[j % 6])
        assert len(pair) == 2
        mine, other = (pair[0], pair[1]) if j % 2 == 0 else (pair[1], pair[0])
        assert mine in own and other in retained  # the concept first, then second
        # the target is the retained part alone: beside the anchor where there is one
        if instead:
            assert anchor == prompt.replace("a car", instead)
        else:
            assert anchor == other
    assert items == C.composite_items(concepts, retained, 6, seed=3)
    assert items != C.composite_items(concepts, retained, 6, seed=4)
    assert C.composite_items(concepts, [], 0, seed=3) == []
    with pytest.raises(UnHypeError, match="composite_prompts needs retained prompts"):
        C.composite_items(concepts, [], 2, seed=3)


def test_a_run_trains_on_composites_but_measures_the_concepts_own_prompts(tiny_sd1, tmp_path,
                                                                           capsys):
    cfg = resolve(fast_options(tiny_sd1, tmp_path, max_train_steps=2, train_batch_size=4,
                               log_every=1, composite_prompts=2))
    cfg.concept_entries = [{"target": "dog", "templates": ["a photo of a {}", "a {}"]},
                           {"target": "car", "anchor": "a bus", "templates": ["a {}", "a red {}"]}]
    session = loop.prepare(cfg)
    err = capsys.readouterr().err
    assert "8 prompts (4 beside a retained prompt)" in err and "--composite_prompts 15" not in err
    assert session.own_items == 4 and len(session.items) == 8
    composites = session.items[4:]
    assert [i for i, _, _ in composites] == [0, 0, 1, 1]
    assert all(p not in ("a photo of a dog", "a dog") for _, p, _ in composites)
    assert session.fingerprint["composite_prompts"] == 2
    assert loop.train(session, progress=False) == 0
    last = [json.loads(ln) for ln in (tmp_path / "erase-loss.jsonl").read_text().splitlines()][-1]
    hn, embed = session.hypernet, session.backend.embed
    with torch.no_grad():
        for c in session.concepts:  # the monitor reads the concept's own prompts only
            own = float(delta_norm(hn(embed([p for p, _ in c.prompts()]))).median())
            assert last["concepts"][c.target]["delta_target"] == pytest.approx(own, rel=1e-5)
    assert load_hypernet(tmp_path / "erase.safetensors").meta.training["composite_prompts"] == 2
    plain = loop.prepare(inline_cfg(tiny_sd1, tmp_path / "plain"), quiet=True)
    # without composites the checkpoint fingerprint is as before: older checkpoints resume
    assert "composite_prompts" not in plain.fingerprint and plain.own_items == len(plain.items)
