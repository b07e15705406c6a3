"""Textual-inversion (TI) embeddings in an A1111 prompt: the SD1/SD2 embedding UnHype reads is
the pooled output of the tokens A1111 makes of the prompt, so a TI name counts as its vectors
(as in the conditioning the UNet gets), not as the words of its name.

A TI whose vectors are the token embeddings of "tabby cat" must give exactly the embedding of
the prompt with "tabby cat" written out."""

from types import SimpleNamespace

import pytest
import torch

import custom_words
import fake_models
from unhype_webui import host

TI_NAME = "zorblax"


def sd1_with_ti(words="tabby cat", hijacked=True, text=None):
    sd1 = fake_models.A1111SD1(unet=torch.nn.Identity(), hijacked=hijacked, text=text)
    if hijacked:
        ccm = sd1.cond_stage_model
        ids = ccm.wrapped.tokenizer(words, add_special_tokens=False)["input_ids"]
        ccm.add_embedding(TI_NAME, ccm.wrapped.transformer.emb.wrapped.weight[ids].clone())
    return sd1


def test_sd1_ti_name_is_read_as_its_vectors():
    sd1 = sd1_with_ti()
    texts = [f"a photo of {TI_NAME}", "a red car"]
    got = host.pooled_embeddings(sd1, "sd1", texts)
    torch.testing.assert_close(got, sd1.pooled(["a photo of tabby cat", "a red car"]),
                               atol=1e-6, rtol=0)
    as_words = sd1.pooled(texts[:1])[0]
    assert float((got[0] - as_words).abs().max()) > 0.05  # the old reading, by name
    assert sd1.cond_stage_model.hijack.fixes is None  # consumed, nothing left for the host
    # the stand-in's conditioning holds the TI the same way (what the UNet gets)
    torch.testing.assert_close(sd1.get_learned_conditioning(texts[:1]),
                               sd1.get_learned_conditioning(["a photo of tabby cat"]))


def test_sd1_plain_prompts_read_the_same_with_and_without_the_hijack():
    sd1 = sd1_with_ti()
    bare = sd1_with_ti(hijacked=False, text=sd1.cond_stage_model.wrapped.transformer)
    texts = ["a photo of a cat", "a red car on a road, at night"]
    want = sd1.pooled(texts)
    torch.testing.assert_close(host.pooled_embeddings(sd1, "sd1", texts), want, atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(host.pooled_embeddings(bare, "sd1", texts), want, atol=1e-6,
                               rtol=0)


def test_escaped_brackets_stay_literal_brackets():
    """A booru tag such as `ganyu \\(genshin impact\\)`: the web UI's conditioning holds the
    brackets as text; plain_text keeps them as `(...)`, which the web UI's tokenize_line would
    read as emphasis again unless they are escaped for it."""
    from unhype.prompt_tags import plain_text

    sd1 = sd1_with_ti()
    text = plain_text(r"a photo of ganyu \(genshin impact\)")
    assert text == "a photo of ganyu (genshin impact)"
    got = host.pooled_embeddings(sd1, "sd1", [text])
    torch.testing.assert_close(got, sd1.pooled([text]), atol=1e-6, rtol=0)
    assert float((got[0] - sd1.pooled(["a photo of ganyu genshin impact"])[0]).abs().max()) > 1e-3


def test_fixes_do_not_outlive_a_failing_encoder(monkeypatch):
    sd1 = sd1_with_ti()
    text = sd1.cond_stage_model.wrapped.transformer

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(text, "forward", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        host.pooled_embeddings(sd1, "sd1", [f"a photo of {TI_NAME}"])
    assert sd1.cond_stage_model.hijack.fixes is None  # the host's next prompt is not touched


def test_sd2_open_clip_ti_name_is_read_as_its_vectors(tmp_path):
    open_clip = pytest.importorskip("open_clip")

    model = fake_models.tiny_open_clip(layers=3, width=1024, heads=16)  # SD2's 1024-d embedding
    tokenizer = open_clip.tokenizer._tokenizer  # what A1111's open_clip wrapper encodes with
    hijack = custom_words.Hijack()
    model.token_embedding = custom_words.EmbeddingsWithFixes(model.token_embedding, hijack)
    ccm = custom_words.CustomWords(
        SimpleNamespace(model=model), hijack,
        tokenize=lambda texts: [tokenizer.encode(t) for t in texts], encode=None,
        id_start=tokenizer.encoder["<start_of_text>"], id_end=tokenizer.encoder["<end_of_text>"],
        id_pad=0)
    cat_ids = tokenizer.encode("cat")
    ccm.add_embedding(TI_NAME, model.token_embedding.wrapped.weight[cat_ids].detach().clone())
    sd2 = SimpleNamespace(cond_stage_model=ccm)
    with torch.no_grad():
        got = host.pooled_embeddings(sd2, "sd2", [f"a photo of {TI_NAME}", "a red car"])
        want = fake_models.sd2_trained_embedding(model, ["a photo of cat", "a red car"],
                                                 tmp_path)
        as_words = fake_models.sd2_trained_embedding(model, [f"a photo of {TI_NAME}"], tmp_path)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert float((got[0] - as_words[0]).abs().max()) > 0.05
    assert hijack.fixes is None
