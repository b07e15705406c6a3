"""Prompt text as the web UIs write it: ``<unhype:name:strength>`` tags and emphasis syntax.

* Tags: ``<unhype:name>``, ``<unhype:name:0.8>`` (A1111's extra-network syntax; the name may hold
  spaces, dots and slashes but no ``:`` or ``>``). Parsed here so every host reads them alike.
* Plain text: the words a prompt's conditioning is made of, without A1111/ComfyUI emphasis
  (``(word:1.2)``, ``((word))``, ``[word]``), ``BREAK`` and extra-network tags. The
  hypernetwork's embedding is computed from this text, as the trainer computed it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from unhype.dynamic_lora import check_strength
from unhype.errors import UnHypeError

TAG_NAME = "unhype"
_TAG = re.compile(r"<unhype:([^:>]+)(?::([^:>]*))?((?::[^>]*)?)>", re.IGNORECASE)
_ANY_TAG = re.compile(r"<[a-zA-Z_][\w-]*:[^>]*>")  # any extra network, A1111's re_extra_net
_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"^(.*?)(?::\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*)?$", re.DOTALL)
_WEIGHT = re.compile(r":\s*[-+]?(?:\d+\.?\d*|\.\d+)\s*(?=\))")
_BREAK = re.compile(r"\bBREAK\b")


@dataclass(frozen=True)
class Tag:
    name: str
    strength: float


def parse_tag_items(items, default: float = 1.0) -> Tag:
    """A tag from A1111's ExtraNetworkParams.items (``["name", "0.8"]``)."""
    items = [str(i).strip() for i in items]
    if not items or not items[0]:
        raise UnHypeError("<unhype:...> tag without a hypernetwork name; write "
                          "<unhype:name> or <unhype:name:strength>")
    if len(items) > 2:
        raise UnHypeError(f"<unhype:{':'.join(items)}> has {len(items)} fields; write "
                          "<unhype:name> or <unhype:name:strength>")
    strength = default
    if len(items) == 2 and items[1] != "":
        try:
            strength = float(items[1])
        except ValueError:
            raise UnHypeError(f"<unhype:{items[0]}:{items[1]}>: strength {items[1]!r} is not "
                              "a number") from None
    return Tag(items[0], check_strength(strength))


def find_tags(prompt: str, default: float = 1.0) -> list[Tag]:
    """Every ``<unhype:...>`` tag of a prompt, in order."""
    tags = []
    for m in _TAG.finditer(prompt or ""):
        items = [m[1]] + ([m[2]] if m[2] is not None else [])
        if m[3]:
            items += m[3][1:].split(":")
        tags.append(parse_tag_items(items, default))
    return tags


def rename_tags(prompt: str, names: dict[str, str]) -> str:
    """The prompt with each ``<unhype:old...>`` tag's name replaced by ``names[old]`` (a pasted
    prompt whose files were renamed since), strengths and the rest as they were."""
    def renamed(m):
        name = m[1].strip()
        return m[0] if name not in names else \
            m[0][:m.start(1) - m.start(0)] + names[name] + m[0][m.end(1) - m.start(0):]

    return _TAG.sub(renamed, prompt or "")


def strip_tags(prompt: str, all_networks: bool = False) -> str:
    """The prompt without ``<unhype:...>`` tags (or without every ``<name:...>`` tag)."""
    return (_ANY_TAG if all_networks else _TAG).sub("", prompt or "")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Composable-diffusion parts: ``"a cat :1.2 AND a dog"`` -> [("a cat", 1.2), ("a dog", 1)]."""
    parts = []
    for chunk in _AND.split(prompt or ""):
        m = _AND_WEIGHT.match(chunk)
        text, weight = m[1], float(m[2]) if m[2] is not None else 1.0
        parts.append((text.strip(), weight))
    return parts


def has_break(prompt: str) -> bool:
    """Whether the prompt has A1111 / Forge's BREAK, which ends a 75-token chunk early (so the
    pooled embedding those hosts compute, the first chunk's, stops at it)."""
    return bool(_BREAK.search(strip_tags(prompt, all_networks=True)))


def plain_text(prompt: str) -> str:
    """The prompt's words without emphasis syntax, BREAK or extra-network tags.

    Escaped brackets (``\\(``) stay as literal brackets, as in A1111's parse_prompt_attention.
    """
    text = strip_tags(prompt, all_networks=True)
    text = _BREAK.sub(" ", text)
    out, i = [], 0
    text = _WEIGHT.sub("", text)
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if ch not in "()[]":
            out.append(ch)
        i += 1
    return re.sub(r"\s+", " ", "".join(out)).strip(" ,")
