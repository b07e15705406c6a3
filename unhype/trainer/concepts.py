"""Concepts to erase, their prompt templates, and the retained prompts.

A concept: `target` (what to erase), `anchor` (what it should look like instead; "" is ESD's
default, the unconditional prediction), `synonyms` (recorded in the file and used for evaluation;
trained on only with `train_on_synonyms = true`) and `templates` (a built-in set name, a file, or a
list of strings with one `{}`). Concept files: TOML (`[[concepts]]`), YAML (a list or
`concepts:`), CSV (target,anchor,synonyms separated by `;`) or TXT (one target a line).

Built-in template sets: objects, people, styles, nudity (unhype/trainer/data/templates_*.txt) and toy.
Built-in retain sets: cifar100 (CIFAR-100 class names), captions (general captions), toy (the
toy world's captions of other shapes). Retained prompts that name a target or synonym are dropped.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from unhype.errors import UnHypeError

DATA = Path(__file__).parent / "data"
TEMPLATE_SETS = ("objects", "people", "styles", "nudity", "toy")
RETAIN_SETS = ("cifar100", "captions", "toy")
DEFAULT_ANCHORS = {"people": "a person", "nudity": "a fully clothed person"}


@dataclass
class Concept:
    target: str
    anchor: str = ""
    synonyms: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    template_set: str = "objects"
    train_on_synonyms: bool = False

    def prompts(self) -> list[tuple[str, str]]:
        """(target prompt, anchor prompt) for every template (and trained synonym)."""
        words = [self.target] + (self.synonyms if self.train_on_synonyms else [])
        pairs = []
        for word in words:
            for tpl in self.templates:
                pairs.append((fill(tpl, word), fill(tpl, self.anchor) if self.anchor else ""))
        return pairs

    def metadata(self) -> dict:
        return {"target": self.target, "anchor": self.anchor, "synonyms": list(self.synonyms),
                "template_set": self.template_set, "templates": len(self.templates),
                "train_on_synonyms": self.train_on_synonyms}


_ARTICLE = re.compile(r"\b([aA]) (?=[aeiouAEIOU])")


def fill(template: str, word: str) -> str:
    text = template.replace("{}", word).strip()
    return _ARTICLE.sub(lambda m: m.group(1) + "n ", text)


def could_be_path(text: str) -> bool:
    """Whether `text` can name a file here: no NUL, no part over the file system's name limit
    (Path.is_file raises on those: an inline list longer than 255 characters)."""
    try:
        Path(text).is_file()
    except (OSError, ValueError):
        return False
    return True


def read_lines(path: Path) -> list[str]:
    """Non-empty, non-comment lines of a TXT file, or the first column of a CSV."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UnHypeError(f"{path}: cannot read it ({exc})") from None
    if path.suffix.lower() == ".csv":
        rows = [r for r in csv.reader(io.StringIO(text)) if r and r[0].strip()]
        if rows and rows[0][0].strip().lower() in ("prompt", "caption", "text", "target"):
            rows = rows[1:]
        return [r[0].strip() for r in rows]
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def template_set(name: str) -> list[str]:
    if name == "toy":
        from unhype.toy import data as toy

        return sorted({t.replace("{shape}", "{}") for t in toy.SHAPE_TEMPLATES} |
                      {t.replace("{shape}", "{}").replace("{colour}", c)
                       for t in toy.FULL_TEMPLATES for c in toy.COLOURS})
    if name in TEMPLATE_SETS:
        return read_lines(DATA / f"templates_{name}.txt")
    path = Path(name)
    if could_be_path(name) and path.is_file():
        templates = read_lines(path)
        bad = [t for t in templates if t.count("{}") != 1]
        if bad or not templates:
            raise UnHypeError(f"{path}: every template needs exactly one '{{}}' "
                              f"(e.g. 'a photo of a {{}}'); bad: {bad[:3]}")
        return templates
    raise UnHypeError(f"template set {name!r}: not one of {TEMPLATE_SETS} and no such file")


def _concept(entry, where: str, default_set: str, default_anchor: str | None) -> Concept:
    if isinstance(entry, str):
        entry = {"target": entry}
    if not isinstance(entry, dict):
        raise UnHypeError(f"{where}: a concept must be a table/mapping or a string, got "
                          f"{type(entry).__name__}")
    known = {"target", "anchor", "synonyms", "templates", "template_set", "train_on_synonyms"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise UnHypeError(f"{where}: unknown concept key(s) {unknown}; known: {sorted(known)}")
    for key in ("target", "anchor"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise UnHypeError(f"{where}: a concept's {key!r} must be a text, got "
                              f"{entry[key]!r}")
    target = str(entry.get("target") or "").strip()
    if not target:
        raise UnHypeError(f"{where}: a concept has no 'target'")
    templates = entry.get("templates", entry.get("template_set", default_set))
    if isinstance(templates, str):
        set_name, templates = templates, template_set(templates)
    elif isinstance(templates, list) and all(isinstance(t, str) for t in templates):
        set_name = "custom"
        bad = [t for t in templates if t.count("{}") != 1]
        if bad or not templates:
            raise UnHypeError(f"{where}: concept {target!r}: each template needs exactly one "
                              f"'{{}}'; bad: {bad[:3]}")
    else:
        raise UnHypeError(f"{where}: concept {target!r}: 'templates' must be a set name, a file "
                          "or a list of strings")
    anchor = entry.get("anchor")
    if anchor is None:
        anchor = default_anchor if default_anchor is not None else DEFAULT_ANCHORS.get(set_name, "")
    anchor = str(anchor).strip()
    synonyms = entry.get("synonyms", [])
    if isinstance(synonyms, str):
        synonyms = [s.strip() for s in synonyms.split(";") if s.strip()]
    if not isinstance(synonyms, list) or not all(isinstance(x, str) for x in synonyms):
        raise UnHypeError(f"{where}: concept {target!r}: 'synonyms' must be a list of texts")
    train_on_synonyms = entry.get("train_on_synonyms", False)
    if not isinstance(train_on_synonyms, bool):  # bool("false") is True
        raise UnHypeError(f"{where}: concept {target!r}: 'train_on_synonyms' must be true or "
                          f"false, got {train_on_synonyms!r}")
    if _norm(target) == _norm(anchor):
        raise UnHypeError(f"{where}: concept {target!r} equals its anchor; the anchor is what "
                          "the concept should turn into (another concept, or '' for ESD's "
                          "unconditional default)")
    synonyms = [str(s).strip() for s in synonyms]  # a blank one would match every prompt
    return Concept(target=target, anchor=anchor, synonyms=[s for s in synonyms if s],
                   templates=templates, template_set=set_name,
                   train_on_synonyms=train_on_synonyms)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def load_concept_file(path: Path) -> list:
    if not path.is_file():
        raise UnHypeError(f"concept file {path}: no such file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UnHypeError(f"concept file {path}: cannot read it ({exc})") from None
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".csv":
            rows = [r for r in csv.reader(io.StringIO(text)) if r and r[0].strip()]
            if rows and rows[0][0].strip().lower() == "target":
                rows = rows[1:]
            return [{"target": r[0], **({"anchor": r[1]} if len(r) > 1 else {}),
                     **({"synonyms": r[2]} if len(r) > 2 else {})} for r in rows]
        elif suffix == ".txt":
            return read_lines(path)
        else:
            raise UnHypeError(f"concept file {path}: unknown type {suffix!r}; use .toml, "
                              ".yaml, .csv or .txt")
    except UnHypeError:
        raise
    except Exception as exc:  # parse errors of tomllib / yaml
        raise UnHypeError(f"concept file {path}: unreadable ({type(exc).__name__}: "
                          f"{exc})") from None
    if isinstance(data, dict):
        data = data.get("concepts")
    if not isinstance(data, list):
        raise UnHypeError(f"concept file {path}: expected a list of concepts (TOML: "
                          "[[concepts]] tables; YAML: a list or 'concepts:')")
    return data


def resolve_concepts(cfg) -> list[Concept]:
    """Concepts from the TOML's inline tables, a concept file, or comma-separated targets."""
    default_set = cfg.template_set or ("toy" if cfg.model_family == "toy"
                                       or cfg.pretrained_model_name_or_path == "toy"
                                       else "objects")
    if cfg.concept_entries is not None:
        entries, where = cfg.concept_entries, f"--config_file {cfg.config_file}"
    elif cfg.concepts and could_be_path(cfg.concepts) and (
            Path(cfg.concepts).is_file() or Path(cfg.concepts).suffix.lower()
            in (".toml", ".yaml", ".yml", ".csv", ".txt")):
        entries, where = load_concept_file(Path(cfg.concepts)), f"concept file {cfg.concepts}"
    elif cfg.concepts:
        entries = [c.strip() for c in cfg.concepts.split(",") if c.strip()]
        where = "--concepts"
    else:
        entries, where = [], "options"
    if not entries:
        raise UnHypeError(f"{where}: no concepts to erase; pass --concepts 'dog' (or a concept "
                          "file) or [[concepts]] tables in the config file")
    concepts = [_concept(e, where, default_set, cfg.anchor) for e in entries]
    seen = set()
    for c in concepts:
        if _norm(c.target) in seen:
            raise UnHypeError(f"{where}: concept {c.target!r} is listed twice")
        seen.add(_norm(c.target))
    warn_anchor_conflicts(concepts, where)
    return concepts


def anchor_conflicts(concepts: list[Concept]) -> list[tuple[Concept, Concept, str]]:
    """(concept, other, word): `concept`'s anchor names `other`'s target or a synonym (a whole
    word, plural -s/-es allowed), `other` being erased by the same file. The concept's prompts are then
    trained towards what the file erases elsewhere: every circle prompt with anchor 'square'
    draws a square, since square's own erasure fires only for prompts that name a square."""
    found = []
    for c in concepts:
        anchor = _norm(c.anchor)
        if not anchor:
            continue
        for other in concepts:
            if other is c:
                continue
            for word in [other.target, *other.synonyms]:
                w = _norm(word)
                if w and re.search(r"\b" + re.escape(w) + r"(?:s|es)?\b", anchor):
                    found.append((c, other, word))
                    break
    return found


def warn_anchor_conflicts(concepts: list[Concept], where: str, skip=()) -> list:
    """Print a warning for each `anchor_conflicts` entry (not refused: a shared word is not
    always a contradiction, e.g. anchor 'a dog on grass' while 'dog breed' is erased); returns
    the (concept target, other target) pairs warned about, `skip` ones left out."""
    warned = []
    for c, other, word in anchor_conflicts(concepts):
        pair = (c.target, other.target)
        if pair in skip or pair in warned:
            continue
        warned.append(pair)
        print(f"unhype train: warning: {where}: concept {c.target!r} has anchor {c.anchor!r}, "
              f"which names {word!r}" + (f" (a synonym of {other.target!r})"
                                         if _norm(word) != _norm(other.target) else "")
              + f", a concept this file also erases: {c.target!r} prompts will be trained "
              f"to draw {other.target!r}, and the erasure of {other.target!r} does not fire "
              f"for them. Use an anchor that is not erased (or '' for ESD's default)",
              file=sys.stderr, flush=True)
    return warned


def exposure_note(n_concepts: int, steps: int, batch: int, accumulation: int = 1) -> str | None:
    """For several concepts: how many steps' worth of prompts each gets (concepts are drawn
    uniformly per prompt, so at a fixed step count each gets 1/K of them)."""
    if n_concepts < 2:
        return None
    prompts = steps * batch * accumulation
    return (f"{n_concepts} concepts share {steps} steps x {batch * accumulation} prompts, drawn "
            f"uniformly over the concepts: each concept gets ~{prompts / n_concepts:.0f} prompt "
            f"draws on average, what a one-concept run gets in ~{steps / n_concepts:.0f} steps. "
            f"To give each the exposure of an N-step one-concept run, train {n_concepts} x N "
            "steps (longer runs want a decaying --lr_scheduler; docs/training.md)")


def resolve_retain(spec: str | None, concepts: list[Concept], backend=None) -> list[str]:
    """Retained prompts, minus any that name a target or synonym."""
    if spec is None:
        spec = "toy" if backend is not None and backend.family.name == "toy" else \
            "cifar100,captions"
    prompts: list[str] = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item == "toy":
            found = backend.default_retain_prompts(concepts) if backend is not None else None
            if not found:
                raise UnHypeError("retain set 'toy' needs the toy model")
            prompts += found
        elif item in RETAIN_SETS:
            prompts += read_lines(DATA / f"retain_{item}.txt")
        elif could_be_path(item) and Path(item).is_file():
            prompts += read_lines(Path(item))
        else:
            raise UnHypeError(f"--retain_prompts: {item!r} is not a built-in set "
                              f"{RETAIN_SETS} and no such file")
    words = [_norm(w) for c in concepts for w in [c.target, *c.synonyms] if _norm(w)]
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")s?\b")
    kept = list(dict.fromkeys(p for p in prompts if not pattern.search(_norm(p))))
    if not kept:
        raise UnHypeError("no retained prompts left after removing those naming a concept")
    return kept


COMPOSITE_JOINERS = (", ", " and ", " next to ")


def composite_items(concepts: list[Concept], retained: list[str], per_concept: int,
                    seed: int) -> list[tuple[int, str, str]]:
    """`per_concept` training prompts per concept that name it beside a retained prompt, as
    (concept index, prompt, anchor prompt): "a red circle, a blue heart", anchored to the
    retained part alone ("a blue heart"; after the concept's own anchor when it has one).

    Trained on only the concept's own prompts, a hypernetwork of several concepts can fire
    weakly for a prompt that also names something else; these teach it to erase the concept
    there too, and (the anchor) to keep the other thing. The order and the joiner alternate;
    which prompts are paired is drawn from `seed`."""
    import random

    if per_concept <= 0:
        return []
    if not retained:
        raise UnHypeError("composite_prompts needs retained prompts to pair the concepts with")
    rng = random.Random(seed)
    items = []
    for index, concept in enumerate(concepts):
        pairs = concept.prompts()
        for j in range(per_concept):
            prompt, anchor = pairs[rng.randrange(len(pairs))]
            other = retained[rng.randrange(len(retained))]
            joiner = COMPOSITE_JOINERS[(j // 2) % len(COMPOSITE_JOINERS)]
            if j % 2:
                items.append((index, joiner.join((other, prompt)),
                              joiner.join((other, anchor)) if anchor else other))
            else:
                items.append((index, joiner.join((prompt, other)),
                              joiner.join((anchor, other)) if anchor else other))
    return items


def composite_note(n_concepts: int, mode: str, saturate: bool, composites: int) -> str | None:
    """For a direct-mode, unsaturated run of several concepts without composites: the recipe
    where they helped on the toy (a saturated file already erased those prompts; fields mode at
    the same steps lost more to the thinner exposure than it gained)."""
    if n_concepts < 2 or composites or mode != "direct" or saturate:
        return None
    return ("a file of several concepts can fire weakly for a prompt that names a concept "
            "beside other things ('a blue heart and a red circle'); --composite_prompts 15 also "
            "trains on such prompts (docs/training.md, 'Prompts that name other things too')")


def concept_table(concepts: list[Concept]) -> list[dict]:
    return [c.metadata() for c in concepts]


def concepts_of_file(table: list[dict], concept_file: Path | None = None,
                     where: str = "the file") -> list[Concept]:
    """The concepts a hypernetwork was trained on, rebuilt from its metadata (`concept_table`):
    a built-in template set (or a template file still on disk) gives the same prompts again;
    custom templates need `concept_file`, the concept file the training read, whose targets and
    template counts must match the metadata's."""
    if not table:
        raise UnHypeError(f"{where} lists no concepts: nothing to rebuild the prompts from")
    if concept_file is not None:
        where_file = f"concept file {concept_file}"
        by_target = {_norm(str(e if isinstance(e, str) else e.get("target", ""))): e
                     for e in load_concept_file(Path(concept_file))}
        out = []
        for entry in table:
            e = by_target.get(_norm(str(entry.get("target", ""))))
            if e is None:
                raise UnHypeError(f"{where_file} has no concept {entry.get('target')!r}, "
                                  f"which {where} was trained on")
            # an entry without templates gets the set the training defaulted to
            default_set = entry.get("template_set") or "objects"
            c = _concept(e, where_file, "objects" if default_set == "custom" else default_set,
                         None)
            out.append(_matching(c, entry, where))
        return out
    out = []
    for entry in table:
        set_name = entry.get("template_set")
        if set_name == "custom" or not set_name:
            raise UnHypeError(f"{where}: concept {entry.get('target')!r} was trained on custom "
                              "templates, which the file does not store; pass --concepts, the "
                              "concept file it was trained from")
        concept = _concept({k: entry[k] for k in ("target", "anchor", "synonyms",
                                                  "train_on_synonyms") if k in entry}
                           | {"template_set": set_name}, where, set_name, None)
        out.append(_matching(concept, entry, where))
    return out


def _matching(concept: Concept, entry: dict, where: str) -> Concept:
    """`concept`, checked against its metadata entry: same template count and synonym use."""
    if entry.get("templates") is not None and len(concept.templates) != entry["templates"]:
        raise UnHypeError(f"{where}: concept {concept.target!r} was trained on "
                          f"{entry['templates']} templates, its template set "
                          f"{concept.template_set!r} now has {len(concept.templates)}; pass "
                          "--concepts, the concept file it was trained from")
    if "train_on_synonyms" in entry:
        concept.train_on_synonyms = bool(entry["train_on_synonyms"])
        concept.synonyms = list(entry.get("synonyms", concept.synonyms))
    return concept


