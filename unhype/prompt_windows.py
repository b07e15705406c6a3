"""Long prompts: the embedding the hypernetwork reads sees only a prompt's first 75 tokens.

Hosts split a long prompt into chunks of 75 tokens for cross-attention (A1111's
``tokenize_line``, ComfyUI's tokenizer, Forge's engine), so the UNet sees every chunk, but the
pooled embedding UnHype reads (CLIP's end-of-text state; SDXL's ``vector``) comes from the first
chunk alone. A concept named after the first 75 tokens (quality tags first, the subject later,
as many prompts are written) would get no LoRA. So a long prompt is also read through
overlapping windows of its words, each short enough for one chunk, and each prompt gets the
LoRA of whichever of its texts (the prompt itself or a window) gives the strongest update; with a
file that names its concepts by direction (unhype.concept_signatures), also the strongest update
of each other erased concept a window names (`combined_rows`): "a cat ... [80 tokens] ... nude"
gets both erasures, not only the stronger.

Windows are made of words (also cut after commas: ``score_9,score_8_up,...`` tag prompts
have no spaces) and measured in CLIP tokens, counted with CLIP's own BPE (the copy the toy
world ships, OpenAI's vocabulary and merges; every SD / SDXL / FLUX CLIP tokenizes with it).
A word's tokens never span whitespace, so a text's count is the sum of its words': a window
holds whole words,
at most 75 tokens; the next starts about 37 tokens later, so any phrase of up to about 30 tokens
lies whole inside one window; the last ends at the prompt's last word. A prompt of up to 75
tokens has no windows (it is read as before). Tag prompts run to 4 tokens a word
(``trending-on-artstation,`` is 7), which is why words are not counted instead. Prompt-weight
syntax such as ``(cat:1.2)`` counts its brackets and numbers, which the hosts strip: windows
come out a little shorter than they could be, never longer.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import torch

from unhype.hypernet import LoraFactors

CHUNK_TOKENS = 75    # what one CLIP chunk holds (77 with start and end of text)
STRIDE_TOKENS = 37   # about half a window: windows overlap by the rest
CLIP_BPE = Path(__file__).resolve().parent / "toy" / "weights" / "tokenizer" / "tokenizer.json"


@lru_cache(maxsize=1)
def _clip_bpe():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(CLIP_BPE))


@lru_cache(maxsize=8192)
def word_tokens(word: str) -> int:
    """CLIP BPE tokens of one whitespace-free word (without start / end of text)."""
    return len(_clip_bpe().encode(word, add_special_tokens=False).ids)


def clip_tokens(text: str) -> int:
    """CLIP BPE tokens of `text` (without start / end of text)."""
    return sum(word_tokens(w) for w in text.split())


def prompt_pieces(text: str, window: int = CHUNK_TOKENS) -> list[str]:
    """The pieces windows are made of: the words, also cut after commas (tag prompts are often
    written ``score_9,score_8_up,1girl,...`` without a space), and a piece longer than `window`
    tokens (a run of text without spaces or commas) cut into pieces that fit. CLIP's BPE
    never joins a word across a comma, so the pieces count as the words do."""
    pieces = []
    for word in text.split():
        for piece in re.findall(r"[^,]+,*|,+", word):
            while word_tokens(piece) > window:
                lo, hi = 1, len(piece) - 1  # the longest prefix that fits (one character fits)
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if word_tokens(piece[:mid]) <= window else (lo, mid - 1)
                pieces.append(piece[:lo])
                piece = piece[lo:]
            pieces.append(piece)
    return pieces


def prompt_windows(text: str, window: int = CHUNK_TOKENS, stride: int = STRIDE_TOKENS
                   ) -> list[str]:
    """The overlapping windows of a prompt longer than `window` CLIP tokens ([] for a shorter
    one): `window_spans` of its `prompt_pieces`, joined by spaces."""
    words = prompt_pieces(text, window)
    return [" ".join(words[a:b]) for a, b in window_spans(words, window, stride)]


def window_spans(words: list[str], window: int = CHUNK_TOKENS, stride: int = STRIDE_TOKENS
                 ) -> list[tuple[int, int]]:
    """[start, end) word spans of the windows: each holds at most `window` tokens (a single
    longer word alone), the next starts once `stride` tokens are behind, and the last ends at
    the last word. [] when all the words fit in `window` tokens."""
    counts = [word_tokens(w) for w in words]
    if sum(counts) <= window:
        return []
    n = len(words)
    spans = []
    start = 0
    while True:
        end, total = start, 0
        while end < n and (end == start or total + counts[end] <= window):
            total += counts[end]
            end += 1
        if end >= n:  # the last window: as many words as fit, back from the last one
            start, total = n, 0
            while start > 0 and (start == n or total + counts[start - 1] <= window):
                start -= 1
                total += counts[start]
            if not spans or spans[-1] != (start, n):
                spans.append((start, n))
            return spans
        spans.append((start, end))
        behind, nxt = 0, start
        while nxt < end - 1 and behind + counts[nxt] <= stride:
            behind += counts[nxt]
            nxt += 1
        start = max(nxt, start + 1)


def update_norms(factors: LoraFactors) -> torch.Tensor:
    """[N] squared Frobenius norm of each row's update B A^T, summed over layers, in float64
    (close windows' updates differ in the last float32 digits)."""
    from unhype.hypernet import update_size_sq

    return update_size_sq({name: (a.double(), b.double()) for name, (a, b) in factors.items()})


def select_rows(factors: LoraFactors, index: list[int]) -> LoraFactors:
    idx = torch.tensor(index)
    return {name: (a[idx.to(a.device)], b[idx.to(b.device)]) for name, (a, b) in factors.items()}


def combined_rows(factors: LoraFactors, owner: list[int], n: int,
                  cosines: torch.Tensor | None = None, rank_by: torch.Tensor | None = None
                  ) -> list[list[int]]:
    """Per prompt (0..n-1), the rows whose updates it gets: its strongest reading (by
    `rank_by`, the update before the gate floor and saturation, which would make readings tie
    or lift a weak one above a strong one; by default the factors' own norms; the first on
    ties) and, where `cosines` [rows, concepts] tell the rows' concepts apart
    (unhype.concept_signatures), in order of strength each reading of a clearly named concept
    that no reading picked so far points to (cosine < COVER_COSINE): "a cat, [80 tokens], a
    dog" gets both, a concept named twice counts once. Without `cosines` (a file that stores
    no signatures) only the strongest."""
    from unhype.concept_signatures import COVER_COSINE, names

    applied = update_norms(factors).cpu()
    key = applied if rank_by is None else rank_by.detach().double().cpu()
    named = None if cosines is None else names(cosines)
    picks = []
    for i in range(n):
        rows = sorted((j for j, o in enumerate(owner) if o == i), key=lambda j: -float(key[j]))
        chosen = rows[:1]
        if named is not None:
            covered = set(torch.nonzero(cosines[chosen[0]] >= COVER_COSINE).flatten().tolist())
            for j in rows[1:]:
                concept = int(named[j])
                if applied[j] > 0 and concept >= 0 and concept not in covered:
                    chosen.append(j)
                    covered |= set(torch.nonzero(cosines[j] >= COVER_COSINE).flatten().tolist())
        picks.append(chosen)
    return picks


def stack_rows(factors: LoraFactors, picks: list[list[int]]) -> LoraFactors:
    """Per prompt, the sum of its picked rows' updates: their factors side by side along the
    rank (B A^T of the stack is the sum), zero-padded to the prompt with the most."""
    most = max((len(p) for p in picks), default=1)
    if most == 1:
        return select_rows(factors, [p[0] for p in picks])
    out = {}
    for name, (a, b) in factors.items():
        r = a.shape[-1]
        a_out = a.new_zeros(len(picks), a.shape[1], r * most)
        b_out = b.new_zeros(len(picks), b.shape[1], r * most)
        for i, rows in enumerate(picks):
            for k, j in enumerate(rows):
                a_out[i, :, k * r:(k + 1) * r] = a[j]
                b_out[i, :, k * r:(k + 1) * r] = b[j]
        out[name] = (a_out, b_out)
    return out
