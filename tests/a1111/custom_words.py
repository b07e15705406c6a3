"""Stand-in of A1111 1.10's hijacked text encoder and textual-inversion lookup.

A1111 wraps every SD1/SD2 text encoder in ``sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords``
(or the open_clip variant) and replaces the token-embedding layer with
``sd_hijack.EmbeddingsWithFixes``. A textual-inversion (TI) name in a prompt becomes placeholder
tokens (id 0) in ``tokenize_line``'s chunk plus a ``PromptChunkFix(offset, embedding)``; before
the encoder runs, the chunk's fixes go to ``hijack.fixes``, and the next call of the embedding
layer reads them, clears them and writes the TI vectors at ``offset + 1`` (after the start token).

Mirrored here with the same names and signatures, written from their documented behaviour:
``tokenize_line(line) -> (chunks, token_count)``, chunks of ``chunk_length + 2`` tokens
(start, 75 tokens padded with the end token, end), ``id_start`` / ``id_end`` / ``id_pad``,
``hijack.embedding_db.find_embedding_at_position(tokens, offset) -> (embedding, n_tokens)``,
``Embedding.vec`` / ``.vectors`` / ``.name``. Emphasis is parsed as ``prompt_parser.
parse_prompt_attention`` does (its token text only: the weights are not applied), so an escaped
bracket is a literal one and a bare one is syntax. Not mirrored: comma backtracking, BREAK.
"""

from __future__ import annotations

import re
from collections import namedtuple
from types import SimpleNamespace

import torch
from torch import nn

PromptChunkFix = namedtuple("PromptChunkFix", ["offset", "embedding"])
_WEIGHT_CLOSE = re.compile(r":\s*[+-]?[.\d]+\s*\)")


def attention_text(line: str) -> list[str]:
    """The text pieces the web UI's attention parser leaves of `line`: ``\\(`` ``\\)``
    ``\\[`` ``\\]`` ``\\\\`` are literal characters; other brackets and ``:weight)`` are
    syntax."""
    pieces, i = [""], 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line) and line[i + 1] in "()[]\\":
            pieces[-1] += line[i + 1]
            i += 2
            continue
        close = _WEIGHT_CLOSE.match(line, i)
        if close or line[i] in "()[]":  # a change of weight: the text goes on in a new piece
            pieces.append("")
            i = close.end() if close else i + 1
            continue
        pieces[-1] += line[i]
        i += 1
    return [p for p in pieces if p] or [""]


class PromptChunk:
    def __init__(self):
        self.tokens, self.multipliers, self.fixes = [], [], []


class Embedding:
    """modules/textual_inversion/textual_inversion.Embedding: ``vec`` [vectors, width]."""

    def __init__(self, vec: torch.Tensor, name: str):
        self.vec, self.name = vec, name
        self.vectors = vec.shape[0]
        self.shorthash = None


class EmbeddingDatabase:
    """Lookup of TI names by their token ids (textual_inversion.EmbeddingDatabase)."""

    def __init__(self):
        self.ids_lookup = {}
        self.word_embeddings = {}

    def register_embedding(self, embedding: Embedding, model):
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def register_embedding_by_name(self, embedding: Embedding, model, name: str):
        """The name's token ids (the model's hijacked encoder's ``tokenize``) key the lookup."""
        ids = model.cond_stage_model.tokenize([name])[0]
        entries = [e for e in self.ids_lookup.get(ids[0], []) if e[1].name != name]
        self.ids_lookup[ids[0]] = sorted(entries + [(ids, embedding)],
                                         key=lambda entry: len(entry[0]), reverse=True)
        self.word_embeddings[name] = embedding
        return embedding

    def find_embedding_at_position(self, tokens, offset):
        for ids, embedding in self.ids_lookup.get(tokens[offset], []):
            if list(tokens[offset:offset + len(ids)]) == ids:
                return embedding, len(ids)
        return None, None


class Hijack:
    """The parts of sd_hijack.StableDiffusionModelHijack the text path reads."""

    def __init__(self):
        self.fixes = None
        self.embedding_db = EmbeddingDatabase()
        self.extra_generation_params = {}


class EmbeddingsWithFixes(nn.Module):
    def __init__(self, wrapped: nn.Module, embeddings: Hijack):
        super().__init__()
        self.wrapped, self.embeddings = wrapped, embeddings

    def forward(self, input_ids):
        batch_fixes = self.embeddings.fixes
        self.embeddings.fixes = None
        inputs_embeds = self.wrapped(input_ids)
        if not batch_fixes or max(len(x) for x in batch_fixes) == 0:
            return inputs_embeds
        vecs = []
        for fixes, tensor in zip(batch_fixes, inputs_embeds):
            for offset, embedding in fixes:
                emb = embedding.vec.to(tensor)
                emb_len = min(tensor.shape[0] - offset - 1, emb.shape[0])
                tensor = torch.cat([tensor[0:offset + 1], emb[0:emb_len],
                                    tensor[offset + 1 + emb_len:]])
            vecs.append(tensor)
        return torch.stack(vecs)


class CustomWords(nn.Module):
    """FrozenCLIPEmbedderWithCustomWords(Base): ``wrapped`` is ldm's embedder, ``tokenize(texts)``
    gives token ids without start/end tokens, ``encode_with_transformers(tokens)`` -> z."""

    chunk_length = 75

    def __init__(self, wrapped, hijack: Hijack, tokenize, encode, id_start, id_end, id_pad):
        super().__init__()
        self.wrapped, self.hijack = wrapped, hijack
        self.tokenize, self.encode_with_transformers = tokenize, encode
        self.id_start, self.id_end, self.id_pad = id_start, id_end, id_pad

    def add_embedding(self, name: str, vec: torch.Tensor) -> Embedding:
        """Test helper: what loading a TI file does (load_from_file -> register_embedding)."""
        embedding = Embedding(vec, name)
        return self.hijack.embedding_db.register_embedding(
            embedding, SimpleNamespace(cond_stage_model=self))

    def tokenize_line(self, line):
        tokens = [t for piece in self.tokenize(attention_text(line)) for t in piece]
        chunks, chunk, token_count = [], PromptChunk(), 0

        def next_chunk(is_last=False):
            nonlocal chunk, token_count
            token_count += len(chunk.tokens) if is_last else self.chunk_length
            chunk.tokens += [self.id_end] * (self.chunk_length - len(chunk.tokens))
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end]
            chunks.append(chunk)
            chunk = PromptChunk()

        position = 0
        while position < len(tokens):
            if len(chunk.tokens) == self.chunk_length:
                next_chunk()
            embedding, n_tokens = self.hijack.embedding_db.find_embedding_at_position(
                tokens, position)
            if embedding is None:
                chunk.tokens.append(tokens[position])
                position += 1
                continue
            if len(chunk.tokens) + embedding.vectors > self.chunk_length:
                next_chunk()
            chunk.fixes.append(PromptChunkFix(len(chunk.tokens), embedding))
            chunk.tokens += [0] * embedding.vectors
            position += n_tokens
        if chunk.tokens or not chunks:
            next_chunk(is_last=True)
        return chunks, token_count

    def forward(self, texts):
        """One chunk per text (the tests' prompts are short): z [N, 77, W]."""
        chunks = [self.tokenize_line(text)[0][0] for text in texts]
        tokens = torch.tensor([c.tokens for c in chunks])
        if self.id_end != self.id_pad:
            for row, chunk in enumerate(chunks):
                tokens[row, chunk.tokens.index(self.id_end) + 1:] = self.id_pad
        self.hijack.fixes = [c.fixes for c in chunks]
        return self.encode_with_transformers(tokens)
