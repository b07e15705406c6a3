"""What a hypernetwork file erases and how it was made, in a few lines for people: the one
summary the hosts show (ComfyUI's Inspect node, the A1111 / Forge tab's Details) and the pieces
`unhype inspect` prints. Reads only the file's metadata; numbers a crafted file stores as
anything else are shown as text, never trusted."""

from __future__ import annotations

import math
from pathlib import Path


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def fmt(value, spec: str = "g") -> str:
    """A metadata value: numbers formatted, anything else shown as text."""
    return format(value, spec) if is_number(value) else repr(value)


def retain_share(training: dict, reference: float | None) -> float | None:
    """Retained (unrelated) prompts' mean ||dW|| at the last logged step over the reference
    (gate_reference, else the concept prompts' mean then): the trainer's `final` record."""
    final = training.get("final") if isinstance(training, dict) else None
    if not isinstance(final, dict) or not is_number(final.get("delta_retain")):
        return None
    ref = reference if reference else final.get("delta_target")
    return final["delta_retain"] / ref if is_number(ref) and ref > 0 else None


def concept_text(c) -> str:
    """``erase 'cat' -> anchor '' (synonyms: kitten (held out, not trained on))``."""
    if not isinstance(c, dict):
        return repr(c)
    synonyms = c.get("synonyms") or []
    syn = (", ".join(map(str, synonyms)) if isinstance(synonyms, list) else repr(synonyms)) or "-"
    if synonyms:  # the trainer's default: synonyms are for evaluation only
        syn += " (trained on)" if c.get("train_on_synonyms") is True else \
            " (held out, not trained on)"
    return f"erase {c.get('target')!r} -> anchor {c.get('anchor', '')!r} (synonyms: {syn})"


def gate_text(loaded) -> str:
    ref, floor = loaded.gate_reference, loaded.gate_floor
    if ref is None:
        return ("none (the file stores no gate reference: trained before it existed; "
                "`unhype stamp-floor` adds it)")
    if floor <= 0:  # apply_floor leaves the factors as they are: no floor, no saturation
        return (f"off (gate_floor 0: every prompt keeps its update; gate reference {ref:.4g})"
                + ("; saturation off too (stored on, but it needs a gate_floor > 0)"
                   if loaded.stored_saturate else ""))
    if loaded.saturate_ignored:
        saturation = f"; saturation off (stored on, but {loaded.saturate_ignored})"
    elif loaded.gate_saturate:
        saturation = "; saturated: raised to the concept's strength from there"
    else:
        saturation = ""
    return (f"prompts whose update is under {floor:.0%} of {ref:.4g} (the concepts' median "
            f"||dW||) get none, full from {2 * floor:.0%}" + saturation)


def signatures_text(loaded) -> str | None:
    """Whether a file of several concepts tells them apart (unhype.concept_signatures); None
    for a file of one concept, where there is nothing to tell apart."""
    targets = [c.get("target") for c in loaded.meta.concepts if isinstance(c, dict)]
    if len(targets) < 2:
        return None
    sig = loaded.signatures
    if sig is None:
        return ("not stored (trained before they existed): saturation raises a prompt to the "
                "weakest concept's strength, and a long prompt gets its strongest window's "
                "update only; `unhype stamp-floor --force` adds them")
    return (f"stored for {', '.join(sig.targets)}: a prompt's concept is named by its "
            "update's direction; saturation raises it to that concept's own strength, and a "
            "long prompt gets the strongest window of each concept it names")


def same_way_texts(loaded) -> list[str]:
    """One line per pair of concepts the file's signatures can never tell apart."""
    from unhype.concept_signatures import same_way_text

    sig = loaded.signatures
    return [same_way_text(*pair) for pair in sig.same_way()] if sig is not None else []


def retain_text(loaded) -> tuple[str | None, str | None]:
    """The stored share of the update unrelated prompts got, and a warning when it is above
    the floor (they are not left alone)."""
    share = retain_share(loaded.meta.training or {}, loaded.gate_reference)
    if share is None:
        return None, None
    of = "the reference ||dW||" if loaded.gate_reference else "the concept prompts' ||dW||"
    text = f"unrelated (retain) prompts got {share:.1%} of {of} at the last training step"
    warning = None
    if loaded.gate_reference is not None and share > loaded.gate_floor:
        warning = (f"that is above the {loaded.gate_floor:.0%} floor: prompts unrelated to the "
                   "concepts still get an update; test yours")
    return text, warning


def training_text(training: dict) -> str:
    keys = ("mode", "max_train_steps", "learning_rate", "eta")
    parts = [f"{k}={training[k]}" for k in keys if k in training]
    base = training.get("pretrained_model_name_or_path")
    if isinstance(base, str) and base:  # a basename or hub id (older files: a full path)
        sha = training.get("base_model_sha256")
        parts.append(f"base model {Path(base).name if Path(base).is_absolute() else base}"
                     + (f" [{sha[:10]}]" if isinstance(sha, str) else ""))  # A1111's AutoV2
    return ", ".join(parts)


def _short(value, limit: int = 120) -> str:
    """A recorded value for a line: long tables (older files kept signatures' numbers in their
    history) cut, with their keys."""
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, dict):
        return f"<{len(value)} entries: {', '.join(map(str, list(value)[:5]))}>"
    return text[:limit] + "..."


def history_lines(meta) -> list[str]:
    """Each later edit of the file's settings (stamp-floor): when, by what, from what to what."""
    out = []
    for entry in meta.history:
        if not isinstance(entry, dict):
            continue
        changed = entry.get("changed") if isinstance(entry.get("changed"), dict) else {}
        changes = "; ".join(f"{k} {_short(v[0])} -> {_short(v[1])}" for k, v in changed.items()
                            if isinstance(v, list) and len(v) == 2)
        out.append(f"{entry.get('date', '?')} by {entry.get('tool') or '?'}: {changes}")
    return out


def summary_lines(loaded) -> list[str]:
    """The file's summary for a host's info panel."""
    meta, cfg = loaded.meta, loaded.meta.config
    lines = [f"file: {loaded.path.name}",
             f"family: {meta.family}; reads {meta.embedding.get('source')} "
             f"({meta.embedding.get('dim')}-d)",
             f"network: {cfg.variant}, rank {cfg.rank}, hidden {cfg.hidden}, "
             f"T={cfg.hyper_steps}, {len(cfg.targets)} target layers, "
             f"{loaded.hypernet.num_parameters(False):,} parameters"]
    lines += [f"concept: {concept_text(c)}" for c in meta.concepts] or \
        ["concept: (no concepts recorded)"]
    lines.append(f"gate floor: {gate_text(loaded)}")
    signatures = signatures_text(loaded)
    lines += [f"concepts told apart: {signatures}"] if signatures else []
    lines += [f"WARNING: {text}" for text in same_way_texts(loaded)]
    retain, warning = retain_text(loaded)
    lines += [f"retained: {retain}"] if retain else []
    lines += [f"WARNING: {warning}"] if warning else []
    if meta.training:
        lines.append(f"training: {training_text(meta.training)}")
    created = meta.created if isinstance(meta.created, dict) else {}
    if created:
        lines.append(f"created: {created.get('date', '?')} by {created.get('by', '?')}")
    lines += [f"changed: {h}" for h in history_lines(meta)]
    return lines
