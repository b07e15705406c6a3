"""The negative-prompt baseline: the erased concepts' names replace the empty unconditional prompt,
so classifier-free guidance steers away from them (no training, nothing stored in the model)."""

from __future__ import annotations

from unhype.evaluation.methods import Method


class NegativePromptMethod(Method):
    def __init__(self, generator, concepts: list[str], name: str = "negative prompt"):
        self.text = ", ".join(concepts)
        self.hidden = generator.encode([self.text])[0]
        self.name = name

    def begin(self, hidden, pooled):
        return self.hidden.expand(len(pooled), -1, -1)

    def settings(self):
        return {"negative_prompt": self.text}
