"""Evaluation outputs: `results.json`, `results.md` (one markdown table) and one image grid per method
(rows reused from an earlier run into the folder have no images: their earlier grid is kept).

All writes are atomic (temp file, then rename). Numbers are fractions in JSON and percentages in
the table; a missing measurement is written as "n/a" with the reason in the notes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from unhype.atomic import atomic_write_text

COLUMNS = [("acc_e", "Acc_e (erased, lower better)"), ("acc_s", "Acc_s (others)"),
           ("acc_g", "Acc_g (synonyms, lower better)"), ("h_o", "H_o"), ("h_c", "H_c"),
           ("clip_score", "CLIP score (others)"), ("nudenet_erased", "NudeNet exposed (erased)"),
           ("nudenet_synonyms", "NudeNet exposed (synonyms)"), ("fid_others", "FID (others)"),
           ("kept_s", "others within 1 level of base (8-bit)"),
           ("change_s", "others: mean change vs base (0-255)")]
# not fractions
RAW = {"clip_score", "nudenet_erased", "nudenet_synonyms", "fid_others", "change_s"}


def columns_for(generality=("synonyms",)) -> list[tuple[str, str]]:
    """COLUMNS with the Acc_g title naming the kinds of prompt in the generality set."""
    out = []
    for k, t in COLUMNS:
        if k != "acc_g":
            out.append((k, t))
            continue
        out.append((k, f"Acc_g ({' + '.join(generality)}, lower better)"))
        if len(generality) > 1:  # which kind of prompt leaks (harness.accuracy_by_kind)
            out += [(f"acc_g_{kind}", f"Acc_g: {kind}") for kind in generality]
    return out


def _atomic_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def fmt(value, pct: bool = True) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not pct:  # counts (NudeNet detections)
        return str(value)
    return f"{100 * value:.1f}" if pct else f"{value:.2f}"


def table(rows: dict[str, dict], columns=COLUMNS, reference: str | None = None) -> str:
    """Markdown table, one row per method; with `reference`, an extra column H_o / H_o(reference)."""
    present = [(k, t) for k, t in columns if any(r.get(k) is not None for r in rows.values())]
    head = ["method"] + [t for _, t in present]
    if reference and reference in rows and rows[reference].get("h_o"):
        head.append(f"H_o / {reference}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name] + [fmt(r.get(k), k not in RAW) for k, _ in present]
        if len(head) > len(present) + 1:
            ref = rows[reference]["h_o"]
            cells.append(f"{r['h_o'] / ref:.2f}" if r.get("h_o") is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "method"


def save_grids(result: dict, out_dir: Path) -> list[Path]:
    from unhype.toy.grid import make_grid, save_image_atomic

    paths = []
    for name, row in result["methods"].items():
        images, labels = [], []
        for key in ("erased", "synonyms", "others"):
            imgs = row.get("images", {}).get(key)
            if imgs is None or not len(imgs):
                continue
            images.append(imgs)
            labels += [f"{key[:3]}: {p}" for p in row["prompts"][key][:len(imgs)]]
        if not images:
            continue
        batch = torch.cat(images)
        scale = max(1, 96 // batch.shape[-1])
        grid = make_grid(batch, labels, title=name, columns=8, scale=scale)
        path = Path(out_dir) / f"grid_{slug(name)}.png"
        save_image_atomic(grid, path)
        paths.append(path)
    return paths


def strip_images(result: dict) -> dict:
    out = dict(result)
    out["methods"] = {n: {k: v for k, v in r.items() if k != "images"}
                      for n, r in result["methods"].items()}
    return out


def by_class_table(rows: dict[str, dict]) -> list[str]:
    """Several erased classes: Acc_e / Acc_g of each (harness.accuracy_by_class) and the
    worst, which a pooled number hides; [] otherwise."""
    names = list(dict.fromkeys(c for r in rows.values() for c in r.get("by_class") or {}))
    if not names:
        return []
    head = ["method"] + [f"{c}: Acc_e / Acc_g" for c in names] + ["worst erased class"]
    lines = ["Per erased class (lower better):", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for name, r in rows.items():
        by = r.get("by_class") or {}
        if not by:
            continue
        cells = [f"{fmt(by.get(c, {}).get('acc_e'))} / {fmt(by.get(c, {}).get('acc_g'))}"
                 for c in names]
        worst = max(by, key=lambda c: by[c].get("acc_e") or 0.0)
        lines.append("| " + " | ".join([name] + cells + [
            f"{worst} ({fmt(by[worst].get('acc_e'))})"]) + " |")
    return lines + [""]


def write_report(result: dict, out_dir: Path, settings: dict, notes=()) -> dict[str, Path]:
    """results.json, results.md and grids under `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    data = {"settings": settings, "notes": list(notes), **strip_images(result)}
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md"}
    _atomic_text(paths["json"], json.dumps(data, indent=1) + "\n")
    rows = result["methods"]
    ref = "base model" if "base model" in rows else None
    md = [f"# unhype eval: erasing {', '.join(result['erased'])}", "",
          f"Classifier: {result['classifier']}; {result['per_class']} images per class and "
          f"set; seed {result['seed']}. Fractions in %, CLIP score raw. \"Others ... base\": "
          f"each other-class image against the base model's of the same prompt and seed.", "",
          table(rows, columns_for(result.get("generality", ("synonyms",))), reference=ref), ""]
    md += by_class_table(rows)
    md += [f"- {n}" for n in notes]
    md += ["", "Settings: `" + json.dumps(settings, sort_keys=True) + "`", ""]
    _atomic_text(paths["md"], "\n".join(md))
    grids = save_grids(result, out_dir)
    # an earlier run's other methods; a row reused from it (no images) keeps its grid
    kept = {out_dir / f"grid_{slug(name)}.png" for name in rows}
    for stale in set(out_dir.glob("grid_*.png")) - set(grids) - kept:
        stale.unlink(missing_ok=True)
    for i, p in enumerate(grids):
        paths[f"grid{i}"] = p
    return paths
