"""The `unhype` CLI: inspect (text and JSON) and bake from a text-encoder folder."""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import hypernet_for, tiny_sd_unet
from unhype.cli import main
from unhype.fileformat import save_hypernet


@pytest.fixture(scope="module")
def hyper_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("h") / "erase_cat.safetensors"
    save_hypernet(path, hypernet_for(tiny_sd_unet(), variant="shared", rank=1), "sd1",
                  concepts=[{"target": "cat", "anchor": "", "synonyms": ["kitten"]}],
                  training={"mode": "fields", "max_train_steps": 7})
    return path


def tiny_text_encoder_folder(folder):
    """A transformers CLIPTextModel (768-d, like SD1's) + a small BPE tokenizer, saved to disk."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": i + 26 for i, c in enumerate(letters)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=54, hidden_size=768, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         max_position_embeddings=77, bos_token_id=52,
                                         eos_token_id=53, pad_token_id=53))
    model.save_pretrained(folder)
    return folder


def test_inspect_text_and_json(hyper_file, capsys):
    assert main(["inspect", str(hyper_file)]) == 0
    text = capsys.readouterr().out
    assert "family     sd1" in text and "erase 'cat'" in text and "kitten" in text
    assert "rank 1: per_layer" in text and "rank 6: per_layer" in text
    assert main(["inspect", "--json", str(hyper_file)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["variant"] == "shared" and info["rank"] == 1
    assert info["training"]["max_train_steps"] == 7
    with safe_open(str(hyper_file), "pt") as f:  # every stored tensor is a network parameter
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert info["parameters"] == stored > 0
    sizes = {row["rank"]: row for row in info["variant_sizes"]}
    assert {row["family"] for row in info["variant_sizes"]} == {"sd1"}
    assert sizes[1]["per_layer"] / sizes[1]["shared"] >= 10
    assert "robustness" not in text  # trained without adversarial gate training


def test_inspect_says_what_precision_the_base_model_was_trained_in(tmp_path, capsys):
    path = tmp_path / "flux_fp8.safetensors"
    for training, line in (
            ({"mode": "direct", "mixed_precision": "bf16", "fp8_base": True},
             "base model bf16 weights, linear layers stored in fp8 (--fp8_base: trained against "
             "the rounded model)"),
            ({"mode": "direct", "mixed_precision": "bf16", "nf4_base": True},
             "base model bf16 weights, linear layers stored in 4-bit NF4 (--nf4_base: trained "
             "against the rounded model)"),
            ({"mode": "direct", "mixed_precision": "no", "fp8_base": False},
             "base model fp32 weights\n")):
        save_hypernet(path, hypernet_for(tiny_sd_unet(), variant="shared", rank=1), "sd1",
                      concepts=[{"target": "cat"}], training=training)
        assert main(["inspect", str(path)]) == 0
        assert line in capsys.readouterr().out


def test_inspect_names_adversarial_gate_training(tmp_path, capsys):
    path = tmp_path / "robust.safetensors"
    save_hypernet(path, hypernet_for(tiny_sd_unet(), variant="shared", rank=1), "sd1",
                  concepts=[{"target": "cat"}],
                  training={"mode": "direct", "adversarial_eps": 0.5, "adversarial_steps": 3})
    assert main(["inspect", str(path)]) == 0
    assert "adversarial gate training, eps 0.5 (3 PGD steps)" in capsys.readouterr().out
    save_hypernet(path, hypernet_for(tiny_sd_unet(), variant="shared", rank=1), "sd1",
                  concepts=[{"target": "cat"}],
                  training={"mode": "direct", "adversarial_eps": 0.5, "adversarial_steps": 3,
                            "adversarial_fraction": 0.5})
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "eps 0.5 (3 PGD steps, on 50% of target prompts)" in text
    assert "gate floor none" in text and "`unhype stamp-floor` adds it" in text
    save_hypernet(path, hypernet_for(tiny_sd_unet(), variant="shared", rank=1), "sd1",
                  concepts=[{"target": "cat"}],
                  training={"mode": "direct", "adversarial_eps": 0.5, "adversarial_steps": 3,
                            "adversarial_loss": "consistency", "consistency_weight": 2.0})
    assert main(["inspect", str(path)]) == 0
    assert "eps 0.5 (3 PGD steps, consistency loss weight 2)" in capsys.readouterr().out
    save_hypernet(path, hypernet_for(tiny_sd_unet(), variant="shared", rank=1), "sd1",
                  concepts=[{"target": "cat"}], training={"mode": "direct", "gate_reference": 42.5})
    assert main(["inspect", str(path)]) == 0
    assert "under 3% of 42.5 (the concepts' median ||dW||) get none, full from 6%" in \
        capsys.readouterr().out
    # a floor of 0 turns the floor and saturation off (apply_floor); older files may store both
    save_hypernet(path, hypernet_for(tiny_sd_unet(), variant="shared", rank=1), "sd1",
                  concepts=[{"target": "cat"}], training={"mode": "direct", "gate_reference": 42.5,
                                                          "gate_floor": 0.0, "gate_saturate": True})
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "gate floor off (gate_floor 0" in text and "saturation off too" in text
    assert "saturated: raised" not in text


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "erase_circle.safetensors"
    save_hypernet(path, hypernet_for(None, family="toy", rank=1), "toy",
                  concepts=[{"target": "circle", "synonyms": ["disk"]}],
                  training={"mode": "direct"})
    return path


def test_inspect_tests_prompts_with_the_update_the_hosts_apply(toy_file, tmp_path, capsys):
    """--prompt: per prompt the update after the gate floor (loaded.generate), its share of
    gate_reference, whether the floor zeroes it, the nearest concept; --per_layer: per layer."""
    from unhype.embedding import load_embedder
    from unhype.fileformat import load_hypernet, save_with_training
    from unhype.hypernet import delta_norm

    prompts = ["a red circle", "a blue square"]
    plain = load_hypernet(toy_file)
    embed = load_embedder(plain.family)
    with torch.no_grad():
        raw = delta_norm(plain.hypernet(embed(prompts))).tolist()
    ref = min(raw) / 0.02  # the weaker prompt is under the 3% floor
    path = save_with_training(plain, tmp_path / "floored.safetensors", gate_reference=ref)
    loaded = load_hypernet(path)
    with torch.no_grad():
        applied = delta_norm(loaded.generate(embed(prompts))).tolist()
    args = ["inspect", str(path)] + [a for p in prompts for a in ("--prompt", p)]
    assert main(args + ["--json", "--per_layer"]) == 0
    rows = json.loads(capsys.readouterr().out)["prompts"]
    assert [r["prompt"] for r in rows] == prompts
    assert [r["applied_norm"] for r in rows] == pytest.approx(applied, rel=1e-4, abs=1e-6)
    assert [r["raw_norm"] for r in rows] == pytest.approx(raw, rel=1e-4)
    assert [r["share_of_reference"] for r in rows] == pytest.approx([a / ref for a in applied],
                                                                    rel=1e-4, abs=1e-6)
    weak = raw.index(min(raw))
    assert rows[weak]["zeroed_by_floor"] and rows[weak]["applied_norm"] == 0
    assert rows[weak]["fires"] == []
    assert set(rows[0]["layers"]) == {t.name for t in loaded.meta.config.targets}
    assert sum(v ** 2 for v in rows[1 - weak]["layers"].values()) == pytest.approx(
        applied[1 - weak] ** 2, rel=1e-4)
    assert main(args) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if "applied ||dW||" in line).split()
    assert header[:4] == ["prompt", "applied", "||dW||", "fires"]
    assert "zeroed (raw 2.0% of the reference: under the floor)" in text
    assert "toy default preset (20 layers)" in text and "SD1" not in text


def test_inspect_prompt_needs_the_text_encoder_of_sd_families(hyper_file, tmp_path, capsys):
    """An SD1 file reads prompts with the base model's text encoder, as `unhype bake`: the
    update inspect reports is the one bake writes."""
    assert main(["inspect", str(hyper_file), "--prompt", "a cat"]) == 2
    assert "needs --text_encoder" in capsys.readouterr().err
    assert main(["inspect", str(hyper_file), "--prompt", " "]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
    assert main(["inspect", str(hyper_file), "--per_layer"]) == 2
    assert "--per_layer shows the layers of the prompts given with --prompt" in \
        capsys.readouterr().err
    folder = tiny_text_encoder_folder(tmp_path / "te")
    assert main(["inspect", str(hyper_file), "--prompt", "a cat", "--text_encoder", str(folder),
                 "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["prompts"]
    assert row["gate_reference"] is None and row["share_of_reference"] is None
    assert main(["bake", str(hyper_file), "--prompt", "a cat", "--text_encoder", str(folder),
                 "-o", str(tmp_path / "cat.safetensors")]) == 0
    baked = float(capsys.readouterr().out.split("||dW|| = ")[1].split(",")[0])
    assert row["applied_norm"] == pytest.approx(baked, rel=1e-3)


def test_inspect_warns_when_retain_prompts_are_above_the_floor(toy_file, tmp_path, capsys):
    from unhype.fileformat import load_hypernet, save_with_training

    plain = load_hypernet(toy_file)
    for mode, retain, warned in (("fields", 1.6, True), ("direct", 0.05, False)):
        path = save_with_training(plain, tmp_path / f"{mode}.safetensors", mode=mode,
                                  gate_reference=10.0, final={"delta_target": 9.8,
                                                              "delta_retain": retain})
        assert main(["inspect", str(path)]) == 0
        text = capsys.readouterr().out
        assert f"retain) prompts got {retain / 10:.1%} of the reference ||dW||" in text
        assert ("warning    that is above the 3% floor" in text) is warned
        assert main(["inspect", str(path), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["retain_share"] == pytest.approx(retain / 10)
        assert info["retain_above_floor"] is warned


def test_inspect_labels_held_out_synonyms(toy_file, tmp_path, capsys):
    assert main(["inspect", str(toy_file)]) == 0
    assert "(synonyms: disk (held out, not trained on))" in capsys.readouterr().out
    path = tmp_path / "trained_syn.safetensors"
    save_hypernet(path, hypernet_for(None, family="toy", rank=1), "toy",
                  concepts=[{"target": "circle", "synonyms": ["disk"],
                             "train_on_synonyms": True}])
    assert main(["inspect", str(path)]) == 0
    assert "(synonyms: disk (trained on))" in capsys.readouterr().out


def test_inspect_shows_crafted_training_values_as_text(tmp_path, capsys):
    path = tmp_path / "crafted.safetensors"
    save_hypernet(path, hypernet_for(tiny_sd_unet(), variant="shared", rank=1), "sd1",
                  concepts=[{"target": "cat"}],
                  training={"mode": "direct", "adversarial_eps": "big", "adversarial_steps": 3,
                            "adversarial_fraction": "most", "adversarial_loss": "consistency",
                            "consistency_weight": "heavy", "final": {"delta_retain": "x"}})
    assert main(["inspect", str(path)]) == 0
    assert "eps 'big' (3 PGD steps, consistency loss weight 'heavy')" in \
        capsys.readouterr().out


def test_inspect_names_the_base_model_by_hash(tmp_path, capsys):
    from unhype.fileformat import load_hypernet
    from unhype.summary import summary_lines

    path = tmp_path / "based.safetensors"
    save_hypernet(path, hypernet_for(None, family="toy", rank=1), "toy",
                  concepts=[{"target": "circle"}],
                  training={"pretrained_model_name_or_path": "v1-5-pruned.safetensors",
                            "base_model_sha256": "6ce0161689" + "0" * 54})
    assert main(["inspect", str(path)]) == 0
    assert "base model sha256 6ce0161689" in capsys.readouterr().out
    assert "training: base model v1-5-pruned.safetensors [6ce0161689]" in \
        summary_lines(load_hypernet(path))


def test_inspect_shows_what_stamp_floor_changed(tmp_path, capsys):
    path, out = tmp_path / "stamped.safetensors", tmp_path / "restamped.safetensors"
    save_hypernet(path, hypernet_for(None, family="toy", rank=1), "toy",
                  concepts=[{"target": "circle"}],
                  training={"mode": "direct", "gate_reference": 2.0, "gate_floor": 0.03})
    assert main(["stamp-floor", str(path), "-o", str(out), "--gate_floor", "0.2"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "by unhype stamp-floor: gate_floor 0.03 -> 0.2" in text
    assert main(["inspect", str(out), "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)["history"]
    assert entry["changed"] == {"gate_floor": [0.03, 0.2]}


def test_a_full_disk_is_a_message_and_the_input_is_intact(tmp_path, capsys, monkeypatch):
    import errno

    import unhype.atomic

    path = tmp_path / "stamped.safetensors"
    save_hypernet(path, hypernet_for(None, family="toy", rank=1), "toy",
                  concepts=[{"target": "circle"}],
                  training={"mode": "direct", "gate_reference": 2.0, "gate_floor": 0.03})
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(unhype.atomic.os, "fsync", full)
    assert main(["stamp-floor", str(path), "-o", str(path), "--gate_floor", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "unhype stamp-floor: error: No space left on device" in err and "Traceback" not in err
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stamped.safetensors"]


def test_bad_file_gives_exit_code_2_and_message(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04junk" * 4)
    assert main(["inspect", str(bad)]) == 2
    assert "pickle" in capsys.readouterr().err


def test_bake_cli_writes_a_kohya_lora(tmp_path, hyper_file, capsys):
    folder = tiny_text_encoder_folder(tmp_path / "te")
    out = tmp_path / "cat_lora.safetensors"
    assert main(["bake", str(hyper_file), "--prompt", "a cat", "--strength", "0.5",
                 "-o", str(out), "--text_encoder", str(folder)]) == 0
    printed = capsys.readouterr()
    assert "wrote" in printed.out and "changes nothing" not in printed.err
    with safe_open(out, "pt") as fh:
        assert fh.metadata()["ss_network_dim"] == "1"
        assert any(k.endswith("lora_up.weight") for k in fh.keys())
    # the printed size is the update's, ||sum of (alpha/r) up @ down||, not lora_up's
    lora = load_file(out)
    dense = sum(float(((lora[k] @ lora[k.replace("lora_up", "lora_down")]) ** 2).sum())
                for k in lora if k.endswith("lora_up.weight")) ** 0.5
    assert f"update ||dW|| = {dense:.4g}" in printed.out
    assert main(["bake", str(hyper_file), "--prompt", "a cat", "--strength", "0",
                 "-o", str(out), "--text_encoder", str(folder)]) == 0
    printed = capsys.readouterr()
    assert "update ||dW|| = 0," in printed.out and "this LoRA changes nothing" in printed.err
    assert main(["bake", str(hyper_file), "--prompt", "a cat", "-o", str(out)]) == 2
    assert "--text_encoder" in capsys.readouterr().err
    assert main(["bake", str(hyper_file), "--prompt", "x", "--strength", "nan",
                 "-o", str(out), "--text_encoder", str(folder)]) == 2
    # a long prompt: the strongest of it and its windows, as the hosts apply it
    from unhype.embedding import load_embedder
    from unhype.fileformat import load_hypernet
    from unhype.prompt_windows import prompt_windows, update_norms

    long = "a red car on a road, " * 12 + "a cat"
    loaded = load_hypernet(hyper_file)
    texts = [long] + prompt_windows(long)
    with torch.no_grad():
        f = loaded.generate(load_embedder(loaded.family, str(folder))(texts))
    best = int(torch.argmax(update_norms(f)))
    assert best > 0  # a window, not the truncated prompt
    assert main(["bake", str(hyper_file), "--prompt", long, "-o", str(out), "--text_encoder",
                 str(folder)]) == 0
    with safe_open(out, "pt") as fh:
        for name, (a, b) in f.items():
            torch.testing.assert_close(fh.get_tensor(f"{name}.lora_up.weight"), b[best])


def test_bake_refuses_an_output_it_cannot_or_must_not_write(tmp_path, hyper_file, capsys):
    import shutil

    own = tmp_path / "erase_cat.safetensors"
    shutil.copy(hyper_file, own)
    before = own.read_bytes()
    for out, message in ((own, "is an input"), (tmp_path, "is a folder"),
                         ("/proc/x.safetensors", "cannot write")):
        # refused before the text encoder is asked for
        assert main(["bake", str(own), "--prompt", "x", "-o", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert own.read_bytes() == before


def test_bake_refuses_a_strength_that_overflows(tmp_path, hyper_file, capsys):
    folder = tiny_text_encoder_folder(tmp_path / "te")
    out = tmp_path / "lora.safetensors"
    assert main(["bake", str(hyper_file), "--prompt", "a cat", "--strength", "1e39",
                 "-o", str(out), "--text_encoder", str(folder)]) == 2
    assert "strength 1e+39 is outside [-100, 100]" in capsys.readouterr().err
    assert not out.exists()


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "unhype", "--help"], capture_output=True,
                            text=True, check=True)
    assert "inspect" in result.stdout and "bake" in result.stdout


def _subcommands(parser, prefix=()):
    """Every (sub)command path of an argparse parser, e.g. ('toy', 'sample')."""
    import argparse

    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, prefix + (name,))


def test_every_command_prints_its_help(capsys):
    """argparse formats help texts with %: a bare "3%" in one option's help crashed `--help`."""
    import re
    from pathlib import Path

    from unhype.cli import build_parser

    root = Path(__file__).resolve().parent.parent

    paths = list(_subcommands(build_parser()))
    assert ("train",) in paths and ("toy", "sample") in paths
    for path in paths:
        with pytest.raises(SystemExit) as done:
            main([*path, "--help"])
        assert done.value.code == 0, path
        out = capsys.readouterr().out
        assert "usage: unhype" in out
        # the files a help text names as examples exist (argparse may wrap them at a "-")
        for name in re.findall(r"unhype/trainer/configs/[\w.-]+\.toml", re.sub(r"-\n\s*", "-", out)):
            assert (root / name).is_file(), (path, name)


def test_eval_help_gives_the_defaults_the_code_uses(capsys):
    """--steps: the toy sampler's own default (not a number written by hand); --gate_floor:
    the file's stored floor."""
    import re

    from unhype.evaluation import cli as eval_cli
    from unhype.toy.model import DEFAULT_STEPS

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"sampling steps (default: toy {DEFAULT_STEPS}, SD {eval_cli.SD_STEPS})" in out
    assert re.search(r"default: the file's gate_floor", out) and "0.03" not in out


def test_the_cli_prints_no_bitsandbytes_import_warning(hyper_file):
    """bitsandbytes (installed for the Forge NF4 tests) logs a warning about its optional CPU
    kernels when transformers imports it; a user's `unhype` output must not start with it."""
    script = ("from unhype.cli import main; "
              f"raise SystemExit(main(['inspect', {str(hyper_file)!r}]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "bitsandbytes" not in out.stderr and "kernels-community" not in out.stderr
    assert out.stdout.startswith(str(hyper_file))


def test_a_text_encoder_folder_finds_its_tokenizer(tmp_path, capsys, monkeypatch):
    """--text_encoder <pipeline>/text_encoder has no tokenizer files: the pipeline's own
    tokenizer beside it is used; a text encoder folder alone gets CLIP's BPE (the built-in
    configs'), never transformers' empty-vocabulary fallback, which reads every prompt as the
    same ids."""
    import shutil

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from unhype.trainer.backends.tiny import build_pipeline_folder
    from unhype.embedding import builtin_tokenizer, load_embedder
    from unhype.families import get_family

    monkeypatch.setenv("UNHYPE_CACHE", str(tmp_path / "cache"))
    sd1 = get_family("sd1")
    pipe = build_pipeline_folder("sd1", tmp_path / "pipe")
    texts = ["a photo of a cat", "the dog"]
    whole = load_embedder(sd1, str(pipe))(texts)
    torch.testing.assert_close(load_embedder(sd1, str(pipe / "text_encoder"))(texts), whole)

    alone = tmp_path / "alone"
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 max_position_embeddings=77)).save_pretrained(alone)
    embedder = load_embedder(sd1, str(alone))
    assert "using CLIP's BPE tokenizer" in capsys.readouterr().err
    reference = CLIPTokenizer.from_pretrained(builtin_tokenizer(sd1))
    assert embedder.tokenizer("a photo of a cat").input_ids == \
        reference("a photo of a cat").input_ids
    vecs = embedder(texts)
    assert not torch.allclose(vecs[0], vecs[1])  # different prompts, different vectors
    # a full CLIP vocabulary beside the tiny pipeline's small encoder: refused, not an
    # index error deep in the embedding
    small = tmp_path / "small_vocab"
    shutil.copytree(pipe / "text_encoder", small)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(builtin_tokenizer(sd1) / name, small / name)
    with pytest.raises(Exception, match="do not belong together"):
        load_embedder(sd1, str(small))


def test_bake_records_and_warns_what_the_prompt_fires(toy_file, tmp_path, capsys):
    """unhype bake probes the embedding it bakes: the metadata names the concept the prompt
    fires and its share of the reference, and a prompt at 0.3 of the reference gets the weak
    warning (the old CLI warned only for an exactly zero update)."""
    from unhype.embedding import load_embedder
    from unhype.fileformat import load_hypernet, save_with_training
    from unhype.hypernet import delta_norm

    plain = load_hypernet(toy_file)
    with torch.no_grad():
        norm = float(delta_norm(plain.hypernet(load_embedder(plain.family)(["a red circle"]))))
    out = tmp_path / "lora.safetensors"
    for share in (0.3, 1.5):
        path = save_with_training(plain, tmp_path / f"g{share}.safetensors",
                                  gate_reference=norm / share, gate_floor=0.03)
        assert main(["bake", str(path), "--prompt", "a red circle", "-o", str(out)]) == 0
        printed = capsys.readouterr()
        with safe_open(out, "pt") as fh:
            meta = fh.metadata()
        claim = f"{share:.2f} of circle's reference"
        assert claim in printed.out and claim in meta["modelspec.description"]
        assert "for prompt 'a red circle': fires " in meta["modelspec.description"]
        assert "the hypernetwork file erases ['circle']" in meta["ss_training_comment"]
        args = json.loads(meta["ss_network_args"])
        assert args["unhype_share_of_reference"] == pytest.approx(share, rel=1e-4)
        if share < 0.5:
            assert "warning: this LoRA is weak for this prompt (fires nothing" in printed.err
            assert args["unhype_fires"] == []
        else:
            assert "weak" not in printed.err and args["unhype_fires"] == ["circle"]


def test_inspect_says_whether_a_file_of_several_concepts_tells_them_apart(tmp_path, capsys):
    from unhype.fileformat import load_hypernet
    from unhype.summary import summary_lines

    net = hypernet_for(None, family="toy", rank=1)
    two = [{"target": "circle"}, {"target": "square"}]
    with_sig, without = tmp_path / "sig.safetensors", tmp_path / "old.safetensors"
    save_hypernet(with_sig, net, "toy", concepts=two, training={"concept_embeddings": {
        "circle": [0.1] * net.config.embed_dim, "square": [-0.1] * net.config.embed_dim}})
    save_hypernet(without, net, "toy", concepts=two, training={})
    assert main(["inspect", str(with_sig)]) == 0
    assert "told apart stored for circle, square" in capsys.readouterr().out
    assert main(["inspect", str(without)]) == 0
    assert "`unhype stamp-floor --force` adds them" in capsys.readouterr().out
    assert any(line.startswith("concepts told apart: stored for circle, square")
               for line in summary_lines(load_hypernet(with_sig)))
    one = tmp_path / "one.safetensors"  # one concept: nothing to tell apart, no line
    save_hypernet(one, net, "toy", concepts=two[:1], training={})
    assert not any("told apart" in line for line in summary_lines(load_hypernet(one)))


def test_signatures_are_named_not_dumped_and_stamp_says_how_to_add_them(tmp_path, capsys):
    from unhype.fileformat import load_hypernet
    from unhype.summary import history_lines

    net = hypernet_for(None, family="toy", rank=1)
    dim = net.config.embed_dim
    two = [{"target": "circle"}, {"target": "square"}]
    path = tmp_path / "sig.safetensors"
    save_hypernet(path, net, "toy", concepts=two, training={
        "gate_reference": 2.0, "concept_embeddings": {"circle": [0.1] * dim,
                                                      "square": [-0.1] * dim}})
    assert main(["inspect", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["training"]["concept_embeddings"] == ["circle", "square"]
    assert len(out) < 20000
    # an older file's history kept the numbers: shown by their keys
    loaded = load_hypernet(path)
    loaded.meta.history.append({"date": "d", "tool": "t", "changed": {
        "concept_embeddings": [None, {"circle": [0.1] * dim, "square": [0.2] * dim}]}})
    [line] = history_lines(loaded.meta)
    assert line == "d by t: concept_embeddings None -> <2 entries: circle, square>"
    # a file of several concepts without them: stamp-floor says --force adds them
    old = tmp_path / "old.safetensors"
    save_hypernet(old, net, "toy", concepts=two, training={"gate_reference": 2.0})
    assert main(["stamp-floor", str(old), "-o", str(tmp_path / "x.safetensors")]) != 0
    assert "stores no concept signatures" in capsys.readouterr().err
    assert main(["stamp-floor", str(old), "-o", str(tmp_path / "y.safetensors"),
                 "--gate_floor", "0.05"]) == 0
    assert "note: this file of several concepts stores no concept signatures" in \
        capsys.readouterr().err
