"""Long prompts: the embedding the hypernetwork reads sees only a prompt's first 75 tokens.

Hosts split a long prompt into chunks of 75 tokens for cross-attention (A1111's
``tokenize_line``, ComfyUI's tokenizer, Forge's engine), so the UNet sees every chunk, but the
pooled embedding UnHype reads (CLIP's end-of-text state; SDXL's ``vector``) comes from the first
chunk alone. A concept named after the first 75 tokens (quality tags first, the subject later,
as many prompts are written) would get no LoRA. So a long prompt is also read through
overlapping windows of its words, each short enough for one chunk, and each prompt gets the
LoRA of whichever of its texts (the prompt itself or a window) gives the strongest update.

Windows are cut by words, not tokens, so no tokenizer is needed: 32 words with a stride of 16,
so any phrase of up to 16 words lies whole inside a window, within its first 48 words. A prompt
of up to 32 words has no windows (it is read as before).
"""

from __future__ import annotations

import torch

from unhype.hypernet import LoraFactors

WINDOW_WORDS = 32
STRIDE_WORDS = 16


def prompt_windows(text: str, window: int = WINDOW_WORDS, stride: int = STRIDE_WORDS
                   ) -> list[str]:
    """The overlapping word windows of a long prompt ([] for one of `window` words or fewer);
    the last window ends at the prompt's last word."""
    words = text.split()
    if len(words) <= window:
        return []
    starts = list(range(0, len(words) - window + 1, stride))
    if starts[-1] + window < len(words):
        starts.append(len(words) - window)
    return [" ".join(words[s:s + window]) for s in starts]


def update_norms(factors: LoraFactors) -> torch.Tensor:
    """[N] squared Frobenius norm of each row's update B A^T, summed over layers: the diagonal
    of probe.gram (N is a few prompts and their windows)."""
    from unhype.probe import gram

    return gram(factors, factors).diagonal()


def strongest(factors: LoraFactors, owner: list[int], n: int) -> LoraFactors:
    """Per prompt (0..n-1), the factors of its candidate with the largest update (the first on
    ties, i.e. the prompt itself)."""
    norms = update_norms(factors).cpu()
    owner_t = torch.tensor(owner)
    pick = []
    for i in range(n):
        rows = torch.nonzero(owner_t == i).flatten()
        pick.append(int(rows[int(torch.argmax(norms[rows]))]))
    index = torch.tensor(pick)
    return {name: (a[index.to(a.device)], b[index.to(b.device)])
            for name, (a, b) in factors.items()}
