"""Prompt sets (editable TOML files in `prompt_sets/`) and the three evaluation sets built from them.

A prompt-set file: `name`, `templates` (each with one `{}` for the class word, optionally
`{colour}` filled from `colours`), `classifier_templates` (zero-shot class prompts, `{}` = class
name) and `[classes]`: class name -> [name, synonym, ...]. Optional `kind = "people"` (H_c).

`build_sets(ps, erased, per_class)` gives, MACE protocol: `erased` (erased classes prompted by
name), `others` (every other class by name) and `synonyms`, the generality set Acc_g is measured
on (erased classes prompted by their synonyms), each a list of (prompt, class index).
Deterministic: no randomness, the k-th prompt of a class uses template k mod T and colour
(k + class) mod C.

A harder generality set (`generality=("synonyms", "paraphrases", "misspellings")`) takes the
erased classes' prompts in turn from each kind: synonyms as above, the class name in
`paraphrase_templates` (wordings the trainer's templates never use; optional key, default
PARAPHRASE_TEMPLATES) and misspellings of the class name (`typos`) in the set's templates. It
asks what a user who rewords or misspells the prompt gets; the count per class stays `per_class`.
`composites` names the erased class beside a class that is not erased ("a red circle and a blue
heart", in either order, joined by each of `composite_joiners` in turn: optional key, default
COMPOSITE_JOINERS): does the erasure hold when a prompt also names something else?
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from unhype.errors import UnHypeError

BUILTIN = Path(__file__).parent / "prompt_sets"
PARAPHRASE_TEMPLATES = ("an illustration of a {}", "a {} icon", "a small {} in the middle",
                        "there is a {} here", "{}, simple drawing", "one {} on black")
GENERALITY_KINDS = ("synonyms", "paraphrases", "misspellings", "composites")
COMPOSITE_JOINERS = (", ", " and ")


def typos(word: str) -> list[str]:
    """Deterministic misspellings: a dropped, a doubled and a swapped letter (distinct, != word)."""
    out = []
    if len(word) > 3:
        out.append(word[:2] + word[3:])
    out.append(word[:1] + word[0] + word[1:] if len(word) < 3 else word[:3] + word[2] + word[3:])
    if len(word) > 3:
        out.append(word[:1] + word[2] + word[1] + word[3:])
    return [w for w in dict.fromkeys(out) if w != word]


def parse_generality(kinds) -> tuple[str, ...]:
    """'synonyms,paraphrases' or a sequence -> the kinds, checked (GENERALITY_KINDS)."""
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    kinds = tuple(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in GENERALITY_KINDS]
    if not kinds or unknown:
        what = ", ".join(repr(k) for k in unknown) + " is not one" if unknown else "give one or more"
        raise UnHypeError(f"generality set: {what} of {', '.join(GENERALITY_KINDS)}")
    return kinds


@dataclass
class PromptSet:
    name: str
    classes: dict[str, list[str]]  # class name -> [name, synonyms...]
    templates: list[str]
    classifier_templates: list[str]
    colours: list[str] = field(default_factory=list)
    kind: str = "objects"
    path: str = ""
    paraphrase_templates: list[str] = field(default_factory=lambda: list(PARAPHRASE_TEMPLATES))
    composite_joiners: list[str] = field(default_factory=lambda: list(COMPOSITE_JOINERS))

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


KINDS = ("objects", "people")  # people: H_c is reported too
KEYS = {"name", "kind", "classes", "templates", "colours", "paraphrase_templates",
        "classifier_templates", "composite_joiners"}


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
    paraphrases = data.get("paraphrase_templates", list(PARAPHRASE_TEMPLATES))
    if not isinstance(paraphrases, list) or not paraphrases or \
            not all(isinstance(t, str) and t.count("{}") == 1 for t in paraphrases):
        problems.append("'paraphrase_templates' must be a list of strings with exactly one '{}'")
    joiners = data.get("composite_joiners", list(COMPOSITE_JOINERS))
    if not isinstance(joiners, list) or not joiners or \
            not all(isinstance(j, str) and j for j in joiners):
        problems.append("'composite_joiners' must be a list of non-empty texts (e.g. [\", \", "
                        "\" and \"])")
    zero_shot = data.get("classifier_templates", ["{}"])
    if not isinstance(zero_shot, list) or not zero_shot or \
            not all(isinstance(t, str) and t.count("{}") == 1 for t in zero_shot):
        problems.append("'classifier_templates' must be a list of strings with exactly one "
                        "'{}' (else every class gets the same zero-shot prompt)")
    colours = data.get("colours", [])
    if not isinstance(colours, list) or not all(isinstance(c, str) and c for c in colours):
        problems.append("'colours' must be a list of texts (\"red\" alone would be r, e, d)")
    if not isinstance(data.get("name", ""), str):
        problems.append("'name' must be a text")
    unknown = sorted(set(data) - KEYS)
    if unknown:  # a typo would silently fall back to a default
        problems.append(f"unknown key(s) {unknown}; known: {sorted(KEYS)}")
    if data.get("kind", "objects") not in KINDS:
        problems.append(f"'kind' must be one of {', '.join(KINDS)}, not {data.get('kind')!r}")
    if problems:
        raise UnHypeError(f"{path}: " + "; ".join(problems))
    if any("{colour}" in t for t in templates) and not colours:
        raise UnHypeError(f"{path}: templates use {{colour}} but 'colours' is empty")
    return PromptSet(name=str(data.get("name", path.stem)), classes=dict(classes),
                     templates=list(templates),
                     classifier_templates=list(data.get("classifier_templates", ["{}"])),
                     colours=colours, kind=str(data.get("kind", "objects")), path=str(path),
                     paraphrase_templates=list(paraphrases), composite_joiners=list(joiners))


def build_sets(ps: PromptSet, erased: list[str], per_class: int,
               generality=("synonyms",)) -> dict[str, list[tuple[str, int]]]:
    if per_class < 1:
        raise UnHypeError(f"images per class must be >= 1, got {per_class}")
    generality = parse_generality(generality)
    erased_idx = sorted({ps.index(w) for w in erased})
    if not erased_idx:
        raise UnHypeError("no erased class given")
    if len(erased_idx) == len(ps.classes):
        raise UnHypeError("every class is erased: nothing is left to measure specificity on")
    sets: dict[str, list[tuple[str, int]]] = {"erased": [], "others": [], "synonyms": []}
    n_t = len(ps.templates)
    others = [c for c in range(len(ps.classes)) if c not in erased_idx]
    for c, (name, words) in enumerate(ps.classes.items()):
        kind = "erased" if c in erased_idx else "others"
        for k in range(per_class):
            sets[kind].append((ps.fill(ps.templates[k % n_t], words[0], k + c), c))
        if c in erased_idx:
            sets["synonyms"] += [(p, c) for _, p in generality_prompts(
                ps, c, per_class, generality, others)]
    return sets


def generality_kinds(ps: PromptSet, erased: list[str], per_class: int,
                     generality=("synonyms",)) -> list[str]:
    """The kind of each prompt of build_sets(...)["synonyms"], in its order."""
    generality = parse_generality(generality)
    erased_idx = sorted({ps.index(w) for w in erased})
    others = [c for c in range(len(ps.classes)) if c not in erased_idx]
    return [kind for c in erased_idx
            for kind, _ in generality_prompts(ps, c, per_class, generality, others)]


def generality_prompts(ps: PromptSet, c: int, per_class: int, kinds: tuple[str, ...],
                       others=()) -> list[tuple[str, str]]:
    """`per_class` (kind, prompt) pairs for erased class `c`, the k-th from kind k mod (kinds this
    class has material for): a class without synonyms or misspellings takes its prompts from the
    others. `others`: the class indices composites pair `c` with (those not erased)."""
    name, *synonyms = ps.classes[ps.class_names[c]]
    material = {"synonyms": synonyms, "paraphrases": ps.paraphrase_templates,
                "misspellings": typos(name), "composites": list(others)}
    kinds = [k for k in kinds if material[k]]
    n_t = len(ps.templates)
    out = []
    for k in range(per_class if kinds else 0):
        kind, j = kinds[k % len(kinds)], k // len(kinds)  # j: the kind's own running index
        if kind == "synonyms":
            prompt = ps.fill(ps.templates[(k + 1) % n_t], synonyms[j % len(synonyms)], k + c)
        elif kind == "paraphrases":
            prompt = ps.fill(ps.paraphrase_templates[j % len(ps.paraphrase_templates)], name, k + c)
        elif kind == "composites":
            other = ps.classes[ps.class_names[others[j % len(others)]]][0]
            mine = ps.fill(ps.templates[k % n_t], name, k + c)
            theirs = ps.fill(ps.templates[(k + 3) % n_t], other, k + c + 1)
            pair = (mine, theirs) if j % 2 == 0 else (theirs, mine)
            joiners = ps.composite_joiners
            prompt = joiners[(j // 2) % len(joiners)].join(pair)
        else:
            misspelt = material["misspellings"]
            prompt = ps.fill(ps.templates[(k + 2) % n_t], misspelt[j % len(misspelt)], k + c)
        out.append((kind, prompt))
    return out
