"""Long prompts are also read through word windows; each prompt keeps its strongest update."""

import torch

from unhype.hypernet import delta_weight
from unhype.prompt_windows import (CHUNK_TOKENS, STRIDE_TOKENS, clip_tokens, combined_rows,
                                   prompt_pieces, prompt_windows, stack_rows, update_norms,
                                   window_spans)

TAGS = ("ultra-detailed, (masterpiece:1.2), best-quality, hyper-realistic, 8k-uhd, "
        "cinematic-lighting, volumetric-fog, award-winning, trending-on-artstation, ")


def test_tokens_are_counted_as_the_hosts_clip_tokenizer_counts_them(tmp_path):
    """The count equals transformers' CLIPTokenizer (the one the built-in configs write, which
    is OpenAI's vocabulary and merges) on prompts with tags, weights, digits and unicode."""
    from transformers import CLIPTokenizer

    from unhype.model_configs import _write_tokenizer

    _write_tokenizer(tmp_path / "tok", "<|endoftext|>")
    reference = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    for text in [TAGS * 3 + "a photo of a cat", "score_9, score_8_up, 1girl, <lora:x:0.8>",
                 "Über-café 東京 ✨ (van gogh:1.3) [cat|dog] BREAK a red car", "a"]:
        assert clip_tokens(text) == len(reference(text, add_special_tokens=False).input_ids)


def test_short_prompts_have_no_windows_and_long_ones_cover_every_phrase():
    assert prompt_windows("a photo of a cat") == []
    assert prompt_windows(" ".join(["cat"] * CHUNK_TOKENS)) == []
    assert len(prompt_windows(" ".join(["cat"] * (CHUNK_TOKENS + 1)))) == 2
    # 32 words, 140 tokens: a tag prompt is long in tokens, not in words
    dense = TAGS * 3 + "a photo of a cat"
    assert len(dense.split()) == 32 and clip_tokens(dense) == 140
    windows = prompt_windows(dense)
    assert windows and windows[-1].endswith("a photo of a cat")
    commas = ",".join(f"score_{i},tag_{i}_up" for i in range(12)) + ",mickey_mouse"
    assert len(commas.split()) == 1 and clip_tokens(commas) > CHUNK_TOKENS  # one 'word'
    assert prompt_windows(commas)[-1].endswith("mickey_mouse")
    for text in [dense, " ".join(f"w{i}" for i in range(120)), TAGS * 8 + "van gogh", commas]:
        words = prompt_pieces(text)
        spans = window_spans(words)
        assert prompt_windows(text) == [" ".join(words[a:b]) for a, b in spans]
        assert all(clip_tokens(" ".join(words[a:b])) <= CHUNK_TOKENS for a, b in spans)
        assert spans[0][0] == 0 and spans[-1][1] == len(words)
        # every phrase of up to 30 tokens lies whole in one window
        for i in range(len(words)):
            for k in range(i + 1, len(words) + 1):
                if clip_tokens(" ".join(words[i:k])) > CHUNK_TOKENS - STRIDE_TOKENS - 8:
                    break
                assert any(a <= i and k <= b for a, b in spans), (text[:30], i, k)


def test_a_word_longer_than_a_chunk_is_cut_into_pieces_that_fit():
    huge = "x" * 400  # no merges: many tokens, one word without spaces or commas
    pieces = prompt_pieces(f"a photo of {huge} and a cat")
    assert "".join(pieces[3:-3]) == huge and all(clip_tokens(p) <= CHUNK_TOKENS for p in pieces)
    windows = prompt_windows(f"a photo of {huge} and a cat")
    assert all(clip_tokens(w) <= CHUNK_TOKENS for w in windows)
    assert windows[-1].endswith("and a cat")


def test_update_norms_and_the_strongest_candidate_per_prompt():
    gen = torch.Generator().manual_seed(0)
    factors = {name: (torch.randn(5, din, 2, generator=gen), torch.randn(5, dout, 2, generator=gen))
               for name, din, dout in (("q", 6, 4), ("k", 3, 7))}
    dense = torch.stack([sum(delta_weight(a[n], b[n]).double().pow(2).sum()
                             for a, b in factors.values()) for n in range(5)])
    torch.testing.assert_close(update_norms(factors), dense)
    owner = [0, 0, 0, 1, 1]
    picked = stack_rows(factors, combined_rows(factors, owner, 2))
    best = [int(torch.argmax(dense[:3])), 3 + int(torch.argmax(dense[3:]))]
    for name, (a, b) in picked.items():
        torch.testing.assert_close(a, factors[name][0][best])
        torch.testing.assert_close(b, factors[name][1][best])
    tied = {name: (a[:1].expand(3, -1, -1), b[:1].expand(3, -1, -1))
            for name, (a, b) in factors.items()}
    zeroed = {name: (a.clone(), b) for name, (a, b) in tied.items()}
    for a, _ in zeroed.values():
        a[1:] = 0
    # silent windows: the prompt's own update stays (the first on ties)
    out = stack_rows(zeroed, combined_rows(zeroed, [0, 0, 0], 1))
    for name, (a, _) in out.items():
        torch.testing.assert_close(a, tied[name][0][:1])
