"""Long prompts are also read through word windows; each prompt keeps its strongest update."""

import torch

from unhype.hypernet import delta_weight
from unhype.prompt_windows import (STRIDE_WORDS, WINDOW_WORDS, prompt_windows, strongest,
                                   update_norms)


def test_short_prompts_have_no_windows_and_long_ones_cover_every_phrase():
    assert prompt_windows("a photo of a cat") == []
    assert prompt_windows(" ".join(["w"] * WINDOW_WORDS)) == []
    words = [f"w{i}" for i in range(75)]
    windows = [w.split() for w in prompt_windows(" ".join(words))]
    assert all(len(w) == WINDOW_WORDS for w in windows)
    assert windows[0][0] == "w0" and windows[-1][-1] == "w74"
    starts = [words.index(w[0]) for w in windows]
    assert starts == [0, 16, 32, 43]
    for length in range(1, STRIDE_WORDS + 1):  # every phrase of up to 16 words lies whole in one
        for i in range(len(words) - length + 1):
            assert any(s <= i and i + length <= s + WINDOW_WORDS for s in starts), (i, length)


def test_update_norms_and_the_strongest_candidate_per_prompt():
    gen = torch.Generator().manual_seed(0)
    factors = {name: (torch.randn(5, din, 2, generator=gen), torch.randn(5, dout, 2, generator=gen))
               for name, din, dout in (("q", 6, 4), ("k", 3, 7))}
    dense = torch.stack([sum(delta_weight(a[n], b[n]).double().pow(2).sum()
                             for a, b in factors.values()) for n in range(5)])
    torch.testing.assert_close(update_norms(factors), dense)
    owner = [0, 0, 0, 1, 1]
    picked = strongest(factors, owner, 2)
    best = [int(torch.argmax(dense[:3])), 3 + int(torch.argmax(dense[3:]))]
    for name, (a, b) in picked.items():
        torch.testing.assert_close(a, factors[name][0][best])
        torch.testing.assert_close(b, factors[name][1][best])
    tied = {name: (a[:1].expand(3, -1, -1), b[:1].expand(3, -1, -1))
            for name, (a, b) in factors.items()}
    zeroed = {name: (a.clone(), b) for name, (a, b) in tied.items()}
    for a, _ in zeroed.values():
        a[1:] = 0
    out = strongest(zeroed, [0, 0, 0], 1)  # silent windows: the prompt's own update stays
    for name, (a, _) in out.items():
        torch.testing.assert_close(a, tied[name][0][:1])
