"""Evaluation units on known inputs: prompt sets, scores, zero-shot CLIP, UCE, SPM gate."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.helpers import TINY_OPEN_CLIP
from unhype.errors import UnHypeError
from unhype.evaluation.harness import _NegativeContext, score
from unhype.evaluation.prompts import build_sets, generality_kinds, load_prompt_set
from unhype.evaluation.report import table
from unhype.evaluation.zero_shot import ZeroShotCLIP


def test_builtin_prompt_sets_match_the_toy_vocabulary():
    from unhype.toy import data

    ps = load_prompt_set("toy")
    assert ps.class_names == list(data.SHAPES)
    assert all(ps.classes[s] == data.SYNONYMS[s] for s in data.SHAPES)
    cifar = load_prompt_set("cifar10")
    assert len(cifar.classes) == 10 and all(len(w) == 4 for w in cifar.classes.values())


def test_build_sets_counts_labels_and_determinism():
    ps = load_prompt_set("toy")
    sets = build_sets(ps, ["disk", "square"], per_class=3)  # a synonym names its class
    assert len(sets["erased"]) == 6 and len(sets["others"]) == 24 and len(sets["synonyms"]) == 6
    assert {c for _, c in sets["erased"]} == {0, 1}
    assert all("circle" not in p and "square" not in p for p, _ in sets["synonyms"])
    assert all(any(w in p for w in ps.classes[ps.class_names[c]][1:]) for p, c in sets["synonyms"])
    assert sets == build_sets(ps, ["circle", "square"], per_class=3)
    assert "an orange" in " ".join(p for p, _ in sets["others"])


def test_harder_generality_set_takes_each_kind_in_turn():
    from unhype.evaluation.prompts import PARAPHRASE_TEMPLATES, typos

    ps = load_prompt_set("toy")
    mace = build_sets(ps, ["circle"], per_class=9)
    assert build_sets(ps, ["circle"], 9, ("synonyms",)) == mace  # the default is MACE's
    hard = build_sets(ps, ["circle", "star"], 9, "synonyms,paraphrases,misspellings")
    assert len(hard["synonyms"]) == 18 and hard["erased"] == build_sets(ps, ["circle", "star"], 9)["erased"]
    circle = [p for p, c in hard["synonyms"] if c == 0]
    assert [p for p, c in hard["synonyms"] if c == 6] and len(circle) == 9
    synonym, paraphrase, misspelt = circle[0::3], circle[1::3], circle[2::3]
    assert all(any(w in p for w in ("disk", "round shape", "dot")) for p in synonym)
    assert paraphrase == [t.replace("{}", "circle") for t in PARAPHRASE_TEMPLATES[:3]]
    assert [next(w for w in typos("circle") if w in p) for p in misspelt] == typos("circle")
    assert not any("circle" in p for p in synonym + misspelt)
    kinds = generality_kinds(ps, ["circle", "star"], 9, "synonyms,paraphrases,misspellings")
    assert kinds == ["synonyms", "paraphrases", "misspellings"] * 6
    with pytest.raises(UnHypeError, match="'spelling' is not one of synonyms"):
        build_sets(ps, ["circle"], 2, "synonyms,spelling")


def test_composites_name_the_erased_class_beside_one_not_erased():
    ps = load_prompt_set("toy")
    erased = ["circle", "star"]
    sets = build_sets(ps, erased, 8, "composites")
    kept = [n for n in ps.class_names if n not in erased]
    for k, (prompt, c) in enumerate(p for p in sets["synonyms"] if p[1] == 0):
        assert c == 0 and "circle" in prompt and "star" not in prompt
        joiner = (", ", " and ")[(k // 2) % 2]
        first, second = prompt.split(joiner)
        mine, other = (first, second) if k % 2 == 0 else (second, first)
        assert "circle" in mine and [n for n in kept if n in other] == [kept[k]]
    assert generality_kinds(ps, erased, 4, "synonyms,composites") == \
        ["synonyms", "composites"] * 4
    assert build_sets(ps, erased, 8, "composites") == sets  # deterministic


def test_composite_joiners_come_from_the_prompt_set(tmp_path):
    f = tmp_path / "held_out.toml"
    f.write_text('templates = ["a {}"]\ncomposite_joiners = [" above ", " with "]\n'
                 '[classes]\ncat = ["cat"]\ndog = ["dog"]\n')
    ps = load_prompt_set(str(f))
    assert [p for p, _ in build_sets(ps, ["cat"], 4, "composites")["synonyms"]] == \
        ["a cat above a dog", "a dog above a cat", "a cat with a dog", "a dog with a cat"]
    f.write_text('templates = ["a {}"]\ncomposite_joiners = []\n'
                 '[classes]\ncat = ["cat"]\ndog = ["dog"]\n')
    with pytest.raises(UnHypeError, match="'composite_joiners' must be a list"):
        load_prompt_set(str(f))


def test_generality_kinds_a_class_lacks_are_filled_by_the_others(tmp_path):
    f = tmp_path / "no_synonyms.toml"
    f.write_text('templates = ["a {}"]\nparaphrase_templates = ["{} art"]\n'
                 '[classes]\ncat = ["cat"]\ndog = ["dog", "puppy"]\n')
    ps = load_prompt_set(str(f))
    sets = build_sets(ps, ["cat"], 4, ("synonyms", "paraphrases", "misspellings"))
    assert [p for p, _ in sets["synonyms"]] == ["cat art", "a catt", "cat art", "a catt"]
    assert generality_kinds(ps, ["cat"], 4, ("synonyms", "paraphrases", "misspellings")) == \
        ["paraphrases", "misspellings"] * 2
    assert build_sets(ps, ["cat"], 4)["synonyms"] == []  # MACE: no synonyms, no Acc_g
    f.write_text('templates = ["a {}"]\nparaphrase_templates = ["no slot"]\n'
                 '[classes]\ncat = ["cat"]\ndog = ["dog"]\n')
    with pytest.raises(UnHypeError, match="'paraphrase_templates' must be"):
        load_prompt_set(str(f))


def test_prompt_set_errors(tmp_path):
    ps = load_prompt_set("toy")
    with pytest.raises(UnHypeError, match="not a class or synonym"):
        build_sets(ps, ["unicorn"], 2)
    with pytest.raises(UnHypeError, match="every class is erased"):
        build_sets(ps, ps.class_names, 2)
    with pytest.raises(UnHypeError, match="no such file"):
        load_prompt_set(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text('templates = ["no placeholder"]\n[classes]\na = ["a"]\nb = ["b"]\n')
    with pytest.raises(UnHypeError, match="exactly one"):
        load_prompt_set(str(bad))
    classes = '[classes]\na = ["a"]\nb = ["b"]\n'
    bad.write_text('templates = ["a {}"]\nclassifier_templates = ["a shape"]\n' + classes)
    with pytest.raises(UnHypeError, match="'classifier_templates' must be a list of strings "
                                          "with exactly one"):
        load_prompt_set(str(bad))
    bad.write_text('templates = ["a {}"]\nkind = "peopel"\n' + classes)
    with pytest.raises(UnHypeError, match="'kind' must be one of objects, people, not 'peopel'"):
        load_prompt_set(str(bad))
    for colours in ('"red"', "5", "[1, 2]"):  # "red" would be the colours r, e, d
        bad.write_text(f'templates = ["a {{colour}} {{}}"]\ncolours = {colours}\n' + classes)
        with pytest.raises(UnHypeError, match="'colours' must be a list of texts"):
            load_prompt_set(str(bad))
    bad.write_text('templates = ["a {}"]\nclassifer_templates = ["a {}"]\n' + classes)
    with pytest.raises(UnHypeError, match="unknown key.*classifer_templates"):
        load_prompt_set(str(bad))


def test_the_built_in_prompt_sets_are_package_data():
    """A non-editable install (pip install ., a wheel) carries the prompt sets eval loads."""
    import fnmatch
    import tomllib
    from pathlib import Path

    import unhype

    root = Path(unhype.__file__).parent
    data = tomllib.loads((root.parent / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["unhype"]
    files = [p.relative_to(root).as_posix() for p in (root / "evaluation" / "prompt_sets")
             .glob("*.toml")]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files)


def test_batch_size_below_one_is_refused_before_any_work():
    from unhype.evaluation.harness import evaluate, generate

    ps = load_prompt_set("toy")
    with pytest.raises(UnHypeError, match="batch size must be >= 1"):
        evaluate(None, [], ps, ["circle"], None, batch_size=0, progress=False)
    with pytest.raises(UnHypeError, match="batch size must be >= 1"):
        generate(None, None, ["a circle"], 0, 0)


def test_accuracy_by_kind_of_generality_prompt():
    from unhype.evaluation.harness import accuracy_by_kind

    items = [("a disk", 0), ("a circle icon", 0), ("a cicle", 0), ("a dot", 0)]
    kinds = ["synonyms", "paraphrases", "misspellings", "synonyms"]
    out = accuracy_by_kind(torch.tensor([0, 3, 0, 5]), items, kinds)
    assert out == {"acc_g_synonyms": 0.5, "acc_g_paraphrases": 0.0, "acc_g_misspellings": 1.0}


def test_score_known_h_o():
    ps = load_prompt_set("toy")
    sets = build_sets(ps, ["circle"], per_class=2)
    perfect = {"erased": torch.tensor([5, 5]), "synonyms": torch.tensor([3, 3]),
               "others": torch.tensor([c for _, c in sets["others"]])}
    s = score(perfect, sets)
    assert (s["acc_e"], s["acc_s"], s["acc_g"]) == (0.0, 1.0, 0.0) and s["h_o"] == pytest.approx(1)
    half = {"erased": torch.tensor([0, 5]), "synonyms": torch.tensor([0, 5]),
            "others": torch.tensor([c if i % 2 else 0 for i, (_, c) in
                                    enumerate(sets["others"])])}
    s = score(half, sets)
    assert s["acc_e"] == 0.5 and s["acc_g"] == 0.5 and s["acc_s"] == 0.5
    assert s["h_o"] == pytest.approx(0.5) and s["h_c"] == pytest.approx(0.5)
    md = table({"base model": {"h_o": 0.25, "acc_e": 1.0}, "x": {"h_o": 0.5, "acc_e": 0.0}},
               reference="base model")
    assert "| x | 0.0 | 50.0 | 2.00 |" in md


class _Lookup:
    """Fake CLIP: image i -> one-hot of its mean colour channel; texts by keyword."""

    def image(self, images):
        return torch.nn.functional.one_hot(images.mean((2, 3)).argmax(1), 3).float()

    def tok(self, prompts):
        return prompts

    def text(self, prompts):
        keys = ["red", "green", "blue"]
        return torch.stack([torch.nn.functional.one_hot(torch.tensor(
            [k in p for k in keys].index(True)), 3).float() for p in prompts])


def test_zero_shot_predicts_and_scores():
    f = _Lookup()
    clf = ZeroShotCLIP(f.image, f.text, f.tok, ["r", "g", "b"],
                       [["red"], ["a green", "green thing"], ["blue"]])
    images = torch.zeros(3, 3, 4, 4)
    images[0, 2], images[1, 0], images[2, 1] = 1, 1, 1
    assert clf.predict(images).tolist() == [2, 0, 1]
    scores = clf.clip_score(images, ["blue", "red", "blue"])
    assert scores.tolist() == pytest.approx([100.0, 100.0, 0.0])


def test_open_clip_path_from_config_and_safetensors(tmp_path, caplog):
    from safetensors.torch import save_file

    import open_clip
    from unhype.evaluation.zero_shot import load_classifier, load_open_clip

    path = tmp_path / "tiny-clip-test.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP))  # not registered yet: load_open_clip does it
    enc_i, enc_t, tok = load_open_clip(str(path))
    model = open_clip.create_model("tiny-clip-test")
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    caplog.clear()
    clf = load_classifier(str(path), ["a", "b"], [["a cat"], ["a dog"]], str(weights))
    # open_clip's "initialized randomly" is false once the local weights are loaded into it
    assert not [r for r in caplog.records if "randomly" in r.getMessage()]
    images = torch.rand(3, 3, 20, 24)
    assert clf.predict(images).shape == (3,) and clf.clip_score(images, ["x"] * 3).shape == (3,)
    # the same weights, loaded through our path, give open_clip's own embeddings
    with torch.no_grad():
        ref = model.eval().encode_text(tok(["a cat"]))
    assert torch.allclose(clf.text_encoder(clf.tokenizer(["a cat"])), ref, atol=1e-5)
    assert enc_t(tok(["a cat"])).shape == (1, 16)
    with pytest.raises(UnHypeError, match="no pickle"):
        load_open_clip(str(path), str(tmp_path / "w.bin"))
    wide = json.loads(json.dumps(TINY_OPEN_CLIP))  # another model's weights: sizes differ
    wide["embed_dim"] = 2 * wide["embed_dim"]
    (tmp_path / "tiny-clip-wide.json").write_text(json.dumps(wide))
    with pytest.raises(UnHypeError, match="not weights of tiny-clip-wide .*size mismatch"):
        load_open_clip(str(tmp_path / "tiny-clip-wide.json"), str(weights))
    with pytest.raises(UnHypeError, match="not an open_clip model"):
        load_open_clip("no-such-model")


def test_uce_closed_form_maps_erased_contexts_and_restores():
    from unhype.baselines.uce import UCEMethod, uce_deltas

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_k = nn.Linear(4, 3, bias=False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mid = nn.Module()
            self.mid.transformer_blocks = nn.ModuleList([nn.Module()])
            self.mid.transformer_blocks[0].attn2 = Block()

    torch.manual_seed(0)
    net = Net()
    w0 = net.mid.transformer_blocks[0].attn2.to_k.weight.detach().clone()
    ce, ca, cp = torch.randn(1, 4), torch.randn(1, 4), torch.randn(1, 4)
    table_ = {"e": ce, "a": ca, "p": cp}

    def encode(prompts):  # one token per prompt; mask [BOS, word, EOS] -> slice from index 1
        h = torch.stack([torch.cat([torch.zeros(1, 4), table_[p]]) for p in prompts])
        return h, torch.ones(len(prompts), 3, dtype=torch.long)

    deltas = uce_deltas(net, encode, ["e"], ["a"], ["p"], lam=1e-4, preserve_scale=1.0)
    path = "mid.transformer_blocks.0.attn2.to_k"
    w1 = w0 + deltas[path]
    assert torch.allclose(w1 @ ce[0], w0 @ ca[0], atol=1e-2)  # erased -> anchor's value
    assert torch.allclose(w1 @ cp[0], w0 @ cp[0], atol=1e-2)  # preserved unchanged
    method = UCEMethod(deltas).attach(net)
    assert torch.allclose(net.mid.transformer_blocks[0].attn2.to_k.weight, w1)
    method.detach()
    assert torch.equal(net.mid.transformer_blocks[0].attn2.to_k.weight, w0)


def test_similarity_gate_opens_on_concepts_only():
    from unhype.baselines.esd import SimilarityGate

    torch.manual_seed(0)
    concept = torch.randn(1, 16) + 0.05 * torch.randn(10, 16)
    retain = torch.randn(50, 16)
    gate = SimilarityGate(concept, retain)
    assert gate(concept).min() > 0.9
    assert gate(retain).median() < 0.1


def test_negative_context_replaces_the_unconditional_half():
    seen = {}

    class Spy(nn.Module):
        def forward(self, x, t, encoder_hidden_states):
            seen["ctx"] = encoder_hidden_states
            return x

    neg = torch.full((2, 3, 4), 7.0)
    ctx = torch.zeros(4, 3, 4)
    _NegativeContext(Spy(), neg)(torch.zeros(4), 0, encoder_hidden_states=ctx)
    assert (seen["ctx"][:2] == 7).all() and (seen["ctx"][2:] == 0).all() and (ctx == 0).all()


def test_several_erased_classes_are_scored_one_by_one():
    # circle (0) fully erased, square (1) kept in half its images: the pooled Acc_e of 25%
    # hides the square; the per-class numbers and the report's worst class do not
    from unhype.evaluation.harness import accuracy_by_class
    from unhype.evaluation.report import by_class_table

    sets = {"erased": [("a circle", 0)] * 2 + [("a square", 1)] * 2,
            "synonyms": [("a disk", 0), ("a box", 1)], "others": []}
    preds = {"erased": torch.tensor([3, 4, 1, 5]), "synonyms": torch.tensor([2, 1]),
             "others": torch.tensor([], dtype=torch.long)}
    got = accuracy_by_class(preds, sets, ["circle", "square", "triangle", "x", "y", "z"])
    assert got == {"by_class": {"circle": {"acc_e": 0.0, "acc_g": 0.0},
                                "square": {"acc_e": 0.5, "acc_g": 1.0}}}
    lines = by_class_table({"m": got})
    assert "| m | 0.0 / 0.0 | 50.0 / 100.0 | square (50.0) |" in lines
    one = {k: v[:2] if isinstance(v, list) else v for k, v in sets.items()}
    one["synonyms"] = sets["synonyms"][:1]
    assert accuracy_by_class(preds, one, ["circle", "square"]) == {}  # one class: no table
    assert by_class_table({"m": {}}) == []


def test_row_keys_change_with_any_code_of_the_package(tmp_path, monkeypatch):
    # the sampler, hooks and gate floor make the images too: a row made by other code of the
    # package (not only unhype/evaluation) must not be reused
    import unhype
    from unhype.evaluation.rows import package_code_sha

    (tmp_path / "toy").mkdir()
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "toy" / "model.py").write_text("STEPS = 20\n")
    monkeypatch.setattr(unhype, "__file__", str(tmp_path / "__init__.py"))
    before = package_code_sha()
    assert package_code_sha() == before
    (tmp_path / "toy" / "model.py").write_text("STEPS = 21\n")
    assert package_code_sha() != before
