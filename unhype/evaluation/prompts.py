"""Prompt sets (editable TOML files in `prompt_sets/`) and the three evaluation sets built from them.

A prompt-set file: `name`, `templates` (each with one `{}` for the class word, optionally
`{colour}` filled from `colours`), `classifier_templates` (zero-shot class prompts, `{}` = class
name) and `[classes]`: class name -> [name, synonym, ...]. Optional `kind = "people"` (H_c).

`build_sets(ps, erased, per_class)` gives, MACE protocol: `erased` (erased classes prompted by
name), `others` (every other class by name) and `synonyms` (erased classes prompted by their
synonyms), each a list of (prompt, class index). Deterministic: no randomness, the k-th prompt of a
class uses template k mod T and colour (k + class) mod C.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from unhype.errors import UnHypeError

BUILTIN = Path(__file__).parent / "prompt_sets"


@dataclass
class PromptSet:
    name: str
    classes: dict[str, list[str]]  # class name -> [name, synonyms...]
    templates: list[str]
    classifier_templates: list[str]
    colours: list[str] = field(default_factory=list)
    kind: str = "objects"
    path: str = ""

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    def index(self, word: str) -> int:
        """Class index of a class name or synonym (case-insensitive)."""
        w = word.strip().lower()
        for i, (name, words) in enumerate(self.classes.items()):
            if w == name.lower() or w in (x.lower() for x in words):
                return i
        raise UnHypeError(f"{word!r} is not a class or synonym of prompt set {self.name} "
                          f"({self.path}); classes: {', '.join(self.classes)}")

    def fill(self, template: str, word: str, k: int) -> str:
        colour = self.colours[k % len(self.colours)] if self.colours else ""
        text = template.replace("{colour}", colour).replace("{}", word)
        text = " ".join(text.split())
        for v in "aeiou":  # "a orange" -> "an orange"
            text = text.replace(f" a {v}", f" an {v}")
            if text.startswith(f"a {v}"):
                text = "an" + text[1:]
        return text

    def class_prompts(self) -> list[list[str]]:
        """Zero-shot prompts per class (an ensemble)."""
        return [[t.replace("{}", name) for t in self.classifier_templates] for name in self.classes]


def available() -> list[str]:
    return sorted(p.stem for p in BUILTIN.glob("*.toml"))


def load_prompt_set(name_or_path: str) -> PromptSet:
    path = Path(name_or_path)
    if not path.is_file():
        path = BUILTIN / f"{name_or_path}.toml"
    if not path.is_file():
        raise UnHypeError(f"prompt set {name_or_path!r}: no such file and not a built-in set "
                          f"({', '.join(available())})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UnHypeError(f"{path}: not valid TOML ({exc})") from None
    classes = data.get("classes")
    templates = data.get("templates")
    problems = []
    if not isinstance(classes, dict) or len(classes) < 2:
        problems.append("[classes] needs at least two classes")
    elif not all(isinstance(v, list) and v and all(isinstance(w, str) for w in v)
                 for v in classes.values()):
        problems.append("each class needs a non-empty list of words")
    if not isinstance(templates, list) or not templates or \
            not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
        problems.append("'templates' must be a list of strings with exactly one '{}'")
    if problems:
        raise UnHypeError(f"{path}: " + "; ".join(problems))
    colours = list(data.get("colours", []))
    if any("{colour}" in t for t in templates) and not colours:
        raise UnHypeError(f"{path}: templates use {{colour}} but 'colours' is empty")
    return PromptSet(name=str(data.get("name", path.stem)), classes=dict(classes),
                     templates=list(templates),
                     classifier_templates=list(data.get("classifier_templates", ["{}"])),
                     colours=colours, kind=str(data.get("kind", "objects")), path=str(path))


def build_sets(ps: PromptSet, erased: list[str], per_class: int) -> dict[str, list[tuple[str, int]]]:
    if per_class < 1:
        raise UnHypeError(f"images per class must be >= 1, got {per_class}")
    erased_idx = sorted({ps.index(w) for w in erased})
    if not erased_idx:
        raise UnHypeError("no erased class given")
    if len(erased_idx) == len(ps.classes):
        raise UnHypeError("every class is erased: nothing is left to measure specificity on")
    sets: dict[str, list[tuple[str, int]]] = {"erased": [], "others": [], "synonyms": []}
    n_t = len(ps.templates)
    for c, (name, words) in enumerate(ps.classes.items()):
        kind = "erased" if c in erased_idx else "others"
        for k in range(per_class):
            sets[kind].append((ps.fill(ps.templates[k % n_t], words[0], k + c), c))
        synonyms = words[1:]
        if c in erased_idx and synonyms:
            for k in range(per_class):
                word = synonyms[k % len(synonyms)]
                sets["synonyms"].append((ps.fill(ps.templates[(k + 1) % n_t], word, k + c), c))
    return sets
