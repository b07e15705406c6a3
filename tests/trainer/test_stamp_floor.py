"""`unhype stamp-floor`: a file trained before the gate floor gets the reference the trainer would
have stored, from a real (tiny) diffusers text encoder; weights and other metadata untouched."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.trainer.conftest import INLINE_CONCEPTS, fast_options
from unhype.trainer import loop
from unhype.trainer.config import resolve
from unhype.cli import main
from unhype.fileformat import load_hypernet, read_header


def trained(model, out, concept_entries=None, **over):
    cfg = resolve(fast_options(model, out, max_train_steps=3, **over))
    if concept_entries is not None:
        cfg.concept_entries = concept_entries
    session = loop.prepare(cfg, quiet=True)
    assert loop.train(session, progress=False) == 0
    return out / "erase.safetensors", loop.gate_reference(session)


def without_reference(path, out):
    """A copy of `path` as the trainer wrote files before the gate floor existed."""
    metadata, _ = read_header(path)
    training = json.loads(metadata["unhype.training"])
    del training["gate_reference"]
    save_file(load_file(str(path)), str(out), {**metadata,
                                               "unhype.training": json.dumps(training)})
    assert load_hypernet(out).gate_reference is None
    return out


def test_stamp_gives_an_old_file_the_trainers_reference(tiny_sd1, tiny_sd2, tmp_path, capsys):
    path, reference = trained(tiny_sd1, tmp_path / "run", concepts="dog,sailboat")
    old = without_reference(path, tmp_path / "old.safetensors")
    new = tmp_path / "new.safetensors"
    assert main(["stamp-floor", str(old), "-o", str(new), "--text_encoder", str(tiny_sd1),
                 "--gate_floor", "0.05"]) == 0
    stamped = load_hypernet(new)
    assert stamped.gate_reference == pytest.approx(reference, rel=1e-5)
    assert stamped.gate_floor == 0.05
    assert "gate_reference" in capsys.readouterr().out
    # the weights bit for bit, every other metadata entry and training key as they were
    before, after = load_file(str(old)), load_file(str(new))
    assert before.keys() == after.keys()
    assert all(before[k].equal(after[k]) for k in before)
    meta_old, meta_new = read_header(old)[0], read_header(new)[0]
    changes = ("unhype.training", "unhype.history")
    assert {k: v for k, v in meta_old.items() if k not in changes} == \
        {k: v for k, v in meta_new.items() if k not in changes}
    [change] = json.loads(meta_new["unhype.history"])
    assert set(change["changed"]) == {"gate_reference", "gate_floor", "gate_reference_source"}
    assert change["changed"]["gate_reference"][0] is None
    t_old, t_new = json.loads(meta_old["unhype.training"]), json.loads(meta_new["unhype.training"])
    assert {k: t_new[k] for k in t_old if k != "gate_floor"} == \
        {k: v for k, v in t_old.items() if k != "gate_floor"}
    assert t_new["gate_reference_source"].startswith("unhype stamp-floor")

    # a stamped file is left alone unless --force; the output may be the input itself
    raw = new.read_bytes()
    assert main(["stamp-floor", str(new), "-o", str(new), "--text_encoder",
                 str(tiny_sd1)]) == 2
    assert "already stores gate_reference" in capsys.readouterr().err
    assert new.read_bytes() == raw
    assert main(["stamp-floor", str(new), "-o", str(new), "--text_encoder", str(tiny_sd1),
                 "--force"]) == 0
    assert load_hypernet(new).gate_reference == pytest.approx(reference, rel=1e-5)

    # the wrong base model (SD2: 1024-d), a missing output folder, a bad floor: an error, nothing written
    for args, message in (
            (["--text_encoder", str(tiny_sd2)], "gives 1024-d vectors"),
            (["--text_encoder", str(tiny_sd1), "--gate_floor", "0.5"], "gate floor"),
            ([], "needs --text_encoder")):
        assert main(["stamp-floor", str(old), "-o", str(tmp_path / "x.safetensors"),
                     *args]) == 2
        assert message in capsys.readouterr().err
    assert main(["stamp-floor", str(old), "-o", str(tmp_path / "no" / "x.safetensors"),
                 "--text_encoder", str(tiny_sd1)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not list(tmp_path.glob("x*")) and load_hypernet(old).gate_reference is None


def test_custom_templates_need_the_concept_file(tiny_sd1, tmp_path, capsys):
    path, reference = trained(tiny_sd1, tmp_path / "run",
                              concept_entries=[dict(c) for c in INLINE_CONCEPTS])
    old = without_reference(path, tmp_path / "old.safetensors")
    new = tmp_path / "new.safetensors"
    base = ["stamp-floor", str(old), "-o", str(new), "--text_encoder", str(tiny_sd1)]
    assert main(base) == 2
    assert "custom templates" in capsys.readouterr().err and not new.exists()

    other = tmp_path / "other.toml"
    other.write_text('[[concepts]]\ntarget = "cat"\ntemplates = ["a {}"]\n')
    assert main(base + ["--concepts", str(other)]) == 2
    assert "no concept 'dog'" in capsys.readouterr().err
    fewer = tmp_path / "fewer.toml"
    fewer.write_text('[[concepts]]\ntarget = "dog"\ntemplates = ["a {}"]\n')
    assert main(base + ["--concepts", str(fewer)]) == 2
    assert "trained on 2 templates" in capsys.readouterr().err

    same = tmp_path / "concepts.toml"
    same.write_text('[[concepts]]\ntarget = "dog"\nanchor = "cat"\nsynonyms = ["puppy"]\n'
                    'templates = ["a photo of a {}", "a {}"]\n')
    assert main(base + ["--concepts", str(same)]) == 0
    assert load_hypernet(new).gate_reference == pytest.approx(reference, rel=1e-5)


def test_a_concept_file_entry_without_templates_gets_the_set_the_file_was_trained_on(tmp_path):
    from unhype.trainer.concepts import concepts_of_file, template_set

    table = [{"target": "circle", "anchor": "", "synonyms": ["disk"], "template_set": "toy",
              "templates": len(template_set("toy")), "train_on_synonyms": False}]
    listed = tmp_path / "concepts.txt"
    listed.write_text("circle\n")
    (c,) = concepts_of_file(table, listed)
    assert c.template_set == "toy" and c.templates == template_set("toy")
    (again,) = concepts_of_file(table)  # the built-in set straight from the metadata
    assert again.prompts() == c.prompts()


def test_gate_saturate_is_stored_by_the_trainer_and_by_stamp_floor(tiny_sd1, tmp_path, capsys):
    """The trainer writes gate_saturate into the file (direct mode); stamp-floor sets it on a file
    that has its reference without the text encoder, weights and reference unchanged; fields-mode
    files and a zero floor are refused, with nothing written."""
    from unhype.errors import UnHypeError

    path, _ = trained(tiny_sd1, tmp_path / "sat", concepts="dog", mode="direct",
                      gate_saturate=True)
    assert load_hypernet(path).gate_saturate is True
    plain, _ = trained(tiny_sd1, tmp_path / "plain", concepts="dog", mode="direct")
    assert load_hypernet(plain).gate_saturate is False
    out = tmp_path / "stamped.safetensors"
    assert main(["stamp-floor", str(plain), "-o", str(out), "--gate_saturate"]) == 0
    stamped = load_hypernet(out)
    assert stamped.gate_saturate is True
    assert stamped.gate_reference == load_hypernet(plain).gate_reference
    before, after = load_file(str(plain)), load_file(str(out))
    assert all(before[k].equal(after[k]) for k in before)
    assert "gate_saturate true" in capsys.readouterr().out
    assert main(["stamp-floor", str(out), "-o", str(out), "--no-gate_saturate"]) == 0
    assert load_hypernet(out).gate_saturate is False
    # the trained value stays on record: each change, from what to what, by what tool
    history = load_hypernet(out).meta.history
    assert [h["changed"] for h in history] == [{"gate_saturate": [False, True]},
                                               {"gate_saturate": [True, False]}]
    assert all(h["tool"] == "unhype stamp-floor" and h["date"] for h in history)
    assert load_hypernet(plain).meta.history == []

    # saturation needs a floor above 0 (the trainer's check): refused, nothing written
    for args in (["--gate_floor", "0", "--gate_saturate"], ["--gate_floor", "0"]):
        source = plain if "--gate_saturate" in args else path  # `path` stores saturation
        zero = tmp_path / "zero.safetensors"
        assert main(["stamp-floor", str(source), "-o", str(zero), *args]) == 2
        assert "gate_saturate needs a gate_floor > 0" in capsys.readouterr().err
        assert not zero.exists()
    assert main(["stamp-floor", str(path), "-o", str(tmp_path / "z.safetensors"),
                 "--gate_floor", "0", "--no-gate_saturate"]) == 0
    assert load_hypernet(tmp_path / "z.safetensors").gate_floor == 0.0
    capsys.readouterr()

    fields, _ = trained(tiny_sd1, tmp_path / "fields", concepts="dog", mode="fields")
    assert main(["stamp-floor", str(fields), "-o", str(tmp_path / "f.safetensors"),
                 "--gate_saturate"]) == 2
    assert "fields mode" in capsys.readouterr().err
    assert not (tmp_path / "f.safetensors").exists()
    for over, message in (({"mode": "fields"}, "gate_saturate needs mode 'direct'"),
                          ({"mode": "direct", "gate_floor": 0.0}, "gate_saturate needs a gate_floor")):
        with pytest.raises(UnHypeError, match=message):
            resolve(fast_options(tiny_sd1, tmp_path / "bad", concepts="dog", gate_saturate=True,
                                 **over))


def test_a_new_floor_on_a_file_with_its_reference_needs_no_text_encoder(tiny_sd1, tmp_path,
                                                                         capsys):
    """docs/training.md: `stamp-floor FILE -o OUT --gate_floor 0.25` changes only the floor;
    outputs that are a folder or the concept file are refused, nothing written."""
    path, _ = trained(tiny_sd1, tmp_path / "run", concepts="dog", mode="direct")
    out = tmp_path / "floored.safetensors"
    assert main(["stamp-floor", str(path), "-o", str(out), "--gate_floor", "0.25"]) == 0
    assert "gate_floor 0.25" in capsys.readouterr().out
    stamped, original = load_hypernet(out), load_hypernet(path)
    assert stamped.gate_floor == 0.25 and original.gate_floor == 0.03
    assert stamped.gate_reference == original.gate_reference
    before, after = load_file(str(path)), load_file(str(out))
    assert all(before[k].equal(after[k]) for k in before)
    assert main(["stamp-floor", str(path), "-o", str(out)]) == 2
    assert "--force to recompute" in capsys.readouterr().err
    concepts = tmp_path / "concepts.toml"
    concepts.write_text('[[concept]]\ntarget = "dog"\n')
    for bad, message in ((tmp_path, "is a folder"), (concepts, "is an input")):
        assert main(["stamp-floor", str(path), "-o", str(bad), "--concepts", str(concepts),
                     "--gate_floor", "0.1"]) == 2
        assert message in capsys.readouterr().err
    assert concepts.read_text() == '[[concept]]\ntarget = "dog"\n'


def test_the_trainer_and_stamp_store_each_concepts_signature(tiny_sd1, tmp_path, capsys):
    """concept_embeddings: the mean embedding of each concept's own training prompts, by which
    hosts name a prompt's concept (unhype.concept_signatures); stamp-floor --force writes the
    same from the text encoder, with each concept's reference."""
    from unhype.concept_signatures import KEY
    from unhype.embedding import load_embedder
    from unhype.trainer.concepts import concepts_of_file

    path, _ = trained(tiny_sd1, tmp_path / "run", concepts="dog,sailboat")
    loaded = load_hypernet(path)
    stored = loaded.meta.training[KEY]
    assert list(stored) == ["dog", "sailboat"]
    embed = load_embedder(loaded.family, str(tiny_sd1))
    for c in concepts_of_file(loaded.meta.concepts, None, where="test"):
        mean = embed([p for p, _ in c.prompts()]).float().mean(0)
        assert torch.allclose(torch.tensor(stored[c.target]), mean, atol=1e-5)
    sig = loaded.signatures
    assert sig.targets == ["dog", "sailboat"]
    assert sig.references == [pytest.approx(v) for v in
                              loaded.meta.training["concept_references"].values()]
    # an old file without them: stamp --force adds both tables
    metadata, _ = read_header(path)
    training = json.loads(metadata["unhype.training"])
    for key in (KEY, "concept_references"):
        del training[key]
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), {**metadata,
                                               "unhype.training": json.dumps(training)})
    assert load_hypernet(old).signatures is None
    new = tmp_path / "new.safetensors"
    assert main(["stamp-floor", str(old), "-o", str(new), "--text_encoder", str(tiny_sd1),
                 "--force"]) == 0
    stamped = load_hypernet(new)
    t_new = stamped.meta.training
    [change] = stamped.meta.history  # the signatures on record by name, not by their numbers
    assert change["changed"][KEY] == [None, "signatures of dog, sailboat"]
    assert t_new["concept_references"] == pytest.approx(
        loaded.meta.training["concept_references"], rel=1e-5)
    for target, values in stored.items():
        assert torch.allclose(torch.tensor(t_new[KEY][target]), torch.tensor(values), atol=1e-5)
