"""Config precedence (defaults < TOML < flags), concept files, built-in sets, bad input."""

import argparse

import pytest

from unhype.trainer import concepts as C
from unhype.trainer.config import add_arguments, resolve
from unhype.errors import UnHypeError


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_toml_overrides_defaults_and_flags_override_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\npretrained_model_name_or_path = "toy"\n'
                    '[training]\nlearning_rate = 5e-4\nmax_train_steps = 77\nmode = "direct"\n'
                    'network_dim = 4\n')
    cfg = resolve(parse(["--config_file", str(toml), "--max_train_steps", "12"]))
    assert cfg.max_train_steps == 12  # flag wins
    assert cfg.learning_rate == 5e-4 and cfg.mode == "direct"  # TOML beats defaults
    assert cfg.retain_learning_rate == 5e-4  # follows learning_rate when unset
    assert cfg.network_alpha == 4.0  # default alpha = dim
    assert cfg.eta == 1.0 and cfg.variant == "per_layer"  # defaults
    toml.write_text('[output]\neval = true\n[training]\ngradient_checkpointing = true\n')
    assert resolve(parse(["--config_file", str(toml)])).eval is True
    cfg = resolve(parse(["--config_file", str(toml), "--no-eval", "--xformers"]))
    assert cfg.eval is False and cfg.xformers is True  # --no-X switches off the file's X
    assert cfg.gradient_checkpointing is True


def test_toml_inline_concepts_and_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("concepts:\n  - target: owl\n    anchor: bird\n")
    toml = tmp_path / "sub" / "run.toml"
    toml.write_text('concepts = "c.yaml"\n')
    cfg = resolve(parse(["--config_file", str(toml)]))
    assert [c.target for c in C.resolve_concepts(cfg)] == ["owl"]
    toml.write_text('[[concepts]]\ntarget = "cat"\nanchor = "dog"\nsynonyms = ["kitten"]\n'
                    'templates = ["a photo of a {}"]\n')
    found = C.resolve_concepts(resolve(parse(["--config_file", str(toml)])))
    assert found[0].prompts() == [("a photo of a cat", "a photo of a dog")]
    assert found[0].synonyms == ["kitten"]
    # a flag replaces the TOML's concepts
    found = C.resolve_concepts(resolve(parse(["--config_file", str(toml), "--concepts", "x,y"])))
    assert [c.target for c in found] == ["x", "y"]


@pytest.mark.parametrize("argv,needle", [
    (["--mode", "fieldz"], "mode must be one of"),
    (["--network_dim", "0"], "network_dim must be >= 1"),
    (["--save_model_as", "ckpt"], "save_model_as"),
    (["--learning_rate", "-1"], "learning_rate must be > 0"),
    (["--xformers", "--sdpa"], "exclude each other"),
    (["--gate_floor", "0.5"], r"gate_floor must be in \[0, 0.5\)"),
    (["--gate_floor", "-0.1"], r"gate_floor must be in \[0, 0.5\)"),
    (["--device", "foo"], "device must be auto, cpu, cuda, cuda:N or mps, got 'foo'"),
    (["--cpu_threads", "-1"], "cpu_threads must be >= 0"),
    (["--resolution", "-8"], "resolution must be a positive multiple of 8, got -8"),
    (["--resolution", "12"], "resolution must be a positive multiple of 8, got 12"),
    (["--resolution", "24", "--model_family", "flux"], "positive multiple of 16, got 24"),
    (["--probe_lambda", "a,b"], "probe_lambda must be comma-separated positive numbers"),
    (["--probe_lambda", "1e-3,-1"], "probe_lambda must be comma-separated positive numbers"),
    (["--eta", "nan"], "eta must be a finite number, got nan"),
    (["--learning_rate", "inf"], "learning_rate must be a finite number"),
    (["--guidance_scale", "nan"], "guidance_scale must be a finite number"),
    (["--retain_weight", "-5"], "retain_weight must be >= 0"),
    (["--network_alpha", "0"], "network_alpha must be > 0"),
    (["--network_hidden", "0"], "network_hidden must be >= 1"),
])
def test_bad_options(argv, needle):
    with pytest.raises(UnHypeError, match=needle):
        resolve(parse(argv))


def test_every_relative_input_path_of_a_toml_is_looked_for_next_to_it_then_here(
        tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "retain.txt").write_text("a photo of a tree\n")
    (conf / "samples.txt").write_text("a dog\n")
    (conf / "tpl.txt").write_text("a drawing of a {}\n")
    here = tmp_path / "here"
    here.mkdir()
    (here / "mine.txt").write_text("a photo of a house\n")
    monkeypatch.chdir(here)
    (conf / "run.toml").write_text(
        'pretrained_model_name_or_path = "toy"\nretain_prompts = "retain.txt, cifar100, mine.txt"'
        '\nsample_prompts = "samples.txt"\noutput_dir = "out"\n'
        '[[concepts]]\ntarget = "cat"\ntemplates = "tpl.txt"\n')
    cfg = resolve(parse(["--config_file", str(conf / "run.toml")]))
    assert cfg.retain_prompts == f"{conf / 'retain.txt'},cifar100,mine.txt"
    assert cfg.sample_prompts == str(conf / "samples.txt")
    assert cfg.output_dir == "out"  # an output: relative to the working directory
    assert C.resolve_concepts(cfg)[0].prompts() == [("a drawing of a cat", "")]
    retained = C.resolve_retain(cfg.retain_prompts, C.resolve_concepts(cfg))
    assert "a photo of a tree" in retained and "a photo of a house" in retained


def test_bad_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = = 3\n")
    with pytest.raises(UnHypeError, match="not valid TOML"):
        resolve(parse(["--config_file", str(bad)]))
    bad.write_text("learning_rat = 3\n")
    with pytest.raises(UnHypeError, match="unknown option"):
        resolve(parse(["--config_file", str(bad)]))
    with pytest.raises(UnHypeError, match="no such file"):
        resolve(parse(["--config_file", str(tmp_path / "missing.toml")]))


def test_builtin_sets():
    assert len(C.template_set("objects")) == 31
    assert len(C.template_set("people")) == 40
    assert all(t.count("{}") == 1 for s in ("objects", "people", "styles", "nudity")
               for t in C.template_set(s))
    cifar = C.read_lines(C.DATA / "retain_cifar100.txt")
    assert len(cifar) == 100 and "aquarium fish" in cifar
    assert len(C.read_lines(C.DATA / "retain_captions.txt")) >= 200


def _cfg(**values):
    return resolve({"pretrained_model_name_or_path": "x", **values})


def test_concept_files(tmp_path):
    (tmp_path / "c.toml").write_text('[[concepts]]\ntarget = "Van Gogh"\ntemplate_set = '
                                     '"styles"\n[[concepts]]\ntarget = "Tom Hanks"\n'
                                     'templates = "people"\n')
    found = C.resolve_concepts(_cfg(concepts=str(tmp_path / "c.toml")))
    assert found[0].prompts()[0] == ("a painting in the style of Van Gogh", "")
    assert found[1].anchor == "a person"  # people's default anchor
    (tmp_path / "c.csv").write_text("target,anchor,synonyms\nairplane,,plane;jet\n")
    found = C.resolve_concepts(_cfg(concepts=str(tmp_path / "c.csv")))
    assert found[0].synonyms == ["plane", "jet"] and len(found[0].prompts()) == 31
    (tmp_path / "c.txt").write_text("# erase these\nship\n\nbird\n")
    assert [c.target for c in C.resolve_concepts(_cfg(concepts=str(tmp_path / "c.txt")))] == \
        ["ship", "bird"]
    assert C.resolve_concepts(_cfg(concepts="apple"))[0].prompts()[0][0] == "a photo of an apple"


@pytest.mark.parametrize("content,suffix,needle", [
    ("concepts = []\n", ".toml", "no concepts"),
    ('[[concepts]]\ntarget = "cat"\nanchor = "Cat "\n', ".toml", "equals its anchor"),
    ('[[concepts]]\ntarget = "cat"\n[[concepts]]\ntarget = "cat"\n', ".toml", "listed twice"),
    ('[[concepts]]\ntarget = "cat"\ntemplates = ["no placeholder"]\n', ".toml", "exactly one"),
    ('[[concepts]]\ntarget = "cat"\ncolour = 1\n', ".toml", "unknown concept key"),
    ("concepts: [target: cat\n", ".yaml", "unreadable"),
    ("x", ".json", "unknown type"),
    ('[[concepts]]\ntarget = "cat"\ntrain_on_synonyms = "false"\n', ".toml",
     "'train_on_synonyms' must be true or false, got 'false'"),
    ('[[concepts]]\ntarget = "cat"\nanchor = ["dog"]\n', ".toml", "'anchor' must be a text"),
    ('[[concepts]]\ntarget = 5\n', ".toml", "'target' must be a text"),
    ('[[concepts]]\ntarget = "cat"\nsynonyms = [1, 2]\n', ".toml",
     "'synonyms' must be a list of texts"),
])
def test_bad_concept_files(tmp_path, content, suffix, needle):
    path = tmp_path / f"c{suffix}"
    path.write_text(content)
    with pytest.raises(UnHypeError, match=needle):
        C.resolve_concepts(_cfg(concepts=str(path)))


def test_unreadable_and_missing_concept_file(tmp_path):
    binary = tmp_path / "c.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UnHypeError, match="cannot read"):
        C.resolve_concepts(_cfg(concepts=str(binary)))
    with pytest.raises(UnHypeError, match="no such file"):
        C.resolve_concepts(_cfg(concepts=str(tmp_path / "none.yaml")))
    with pytest.raises(UnHypeError, match="no concepts"):
        C.resolve_concepts(_cfg())


def test_retain_set_drops_prompts_naming_a_concept():
    found = C.resolve_concepts(_cfg(concepts="dog,cat"))
    found[0].synonyms = ["puppy"]
    retained = C.resolve_retain("cifar100,captions", found)
    assert not [p for p in retained if "dog" in p or "cat " in p or p.endswith("cat")]
    assert "aquarium fish" in retained and len(retained) > 250
    with pytest.raises(UnHypeError, match="not a built-in set"):
        C.resolve_retain("imagenet", found)


def test_blank_synonyms_are_dropped_and_keep_the_retained_prompts(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[concepts]]\ntarget = "disc"\nsynonyms = ["disk", " ", ""]\n')
    found = C.resolve_concepts(_cfg(concepts=str(path)))
    assert found[0].synonyms == ["disk"]
    found[0].synonyms.append("  ")  # however it got there, it matches no prompt
    assert len(C.resolve_retain("cifar100,captions", found)) > 250


def test_a_long_inline_concept_list_is_not_taken_for_a_file():
    names = [f"concept number {i} with a long name" for i in range(12)]
    assert len(",".join(names)) > 255
    found = C.resolve_concepts(_cfg(concepts=",".join(names)))
    assert [c.target for c in found] == names
    assert C.resolve_concepts(_cfg(concepts="x" * 300 + ".txt"))[0].target == "x" * 300 + ".txt"
    with pytest.raises(UnHypeError, match="not a built-in set"):
        C.resolve_retain("y" * 300, found)


def test_a_long_inline_concept_list_in_a_config_file(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(f'concepts = "{",".join(["a rather long concept name"] * 12)}"\n')
    cfg = resolve(parse(["--config_file", str(toml)]))
    assert cfg.concepts.startswith("a rather long concept name,")


def test_sample_grids_of_non_latin_and_long_concepts_stay_apart(tiny_sd1, tmp_path):
    from tests.trainer.conftest import fast_options
    from unhype.trainer import loop

    long = "a very long concept " * 15
    cfg = resolve(fast_options(tiny_sd1, tmp_path, max_train_steps=1,
                               concepts=f"круг,квадрат,{long.strip()}"))
    assert loop.train(loop.prepare(cfg, quiet=True), progress=False) == 0
    grids = sorted(p.name for p in (tmp_path / "samples").glob("*-step*.png"))
    assert len(grids) == 3 and all(len(g) < 80 for g in grids)
    assert grids[0].startswith("a_very_long_concept")
    assert len(list((tmp_path / "samples").glob("*-prompts.txt"))) == 3


def test_logging_dir_and_sample_prompts_are_checked_before_any_model_loads(tmp_path):
    a_file = tmp_path / "log.txt"
    a_file.write_text("")
    for argv, needle in ((["--logging_dir", str(a_file)], "is a file, not a folder"),
                         (["--logging_dir", str(a_file / "sub")], "is a file, not a folder"),
                         (["--sample_prompts", str(a_file)], "no prompts in it"),
                         (["--sample_prompts", str(tmp_path / "none.txt")], "no such file")):
        with pytest.raises(UnHypeError, match=needle):
            resolve(parse(argv))
    assert resolve(parse(["--logging_dir", str(tmp_path / "new" / "logs")])).logging_dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt"]


def test_the_shipped_configs_are_found_outside_a_checkout(tmp_path, monkeypatch):
    """The docs' `--config_file unhype/trainer/configs/toy_demo.toml` also works from a pip install
    (run from any folder: the shipped file of that name); a missing one lists the shipped."""
    from unhype.trainer.config import SHIPPED_CONFIGS, _read_toml, find_config_file

    monkeypatch.chdir(tmp_path)
    assert find_config_file("unhype/trainer/configs/toy_demo.toml") == SHIPPED_CONFIGS / "toy_demo.toml"
    assert find_config_file("toy_robust.toml") == SHIPPED_CONFIGS / "toy_robust.toml"
    assert find_config_file("trainer/configs/toy_robust.toml") == SHIPPED_CONFIGS / "toy_robust.toml"
    assert _read_toml("unhype/trainer/configs/toy_demo.toml")["mode"] == "fields"
    mine = tmp_path / "unhype" / "trainer" / "configs" / "toy_demo.toml"  # a user's own file wins
    mine.parent.mkdir(parents=True)
    mine.write_text('mode = "direct"\n')
    assert _read_toml("unhype/trainer/configs/toy_demo.toml")["mode"] == "direct"
    with pytest.raises(UnHypeError, match="no such file \\(shipped configs: .*toy_demo.toml"):
        find_config_file("elsewhere/toy_demo.toml")


@pytest.mark.parametrize("name", ["", " ", "..", "../escaped", "sub/name", "a\\b"])
def test_output_name_must_be_a_plain_stem(name):
    with pytest.raises(UnHypeError, match="output_name must be a plain file name stem"):
        resolve({"pretrained_model_name_or_path": "toy", "output_name": name})
    assert resolve({"pretrained_model_name_or_path": "toy", "output_name": "v1.2_erase"})


def test_an_unknown_train_flag_is_reported_with_train_usage(capsys):
    from unhype.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["train", "--max_train_steps", "3", "--bogus", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("usage: unhype train") and "unrecognized arguments: --bogus 1" in err
