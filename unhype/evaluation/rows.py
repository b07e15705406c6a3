"""Finished evaluation rows on disk, so an interrupted `unhype eval` resumes: `--out/rows/`.

Each method's row is written, atomically, as soon as it is scored (`rows/<slot>.json`: the
row's numbers, its display name and the key of everything that determines them); the base
model's other-class images, which every later row is compared with (`change_s` / `kept_s`), go
to `rows/base_others.safetensors`. A rerun with the same --out reuses a row only when its stored
key equals the new one, field for field; a row whose settings differ is recomputed and
overwritten, never mixed in. A `Slot` is one planned row: its file name, key, the display name
when known before the method is built, and how to build it (a baseline trains, or loads the
weights an earlier run trained, unhype.evaluation.trained, only when its row is due).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from unhype.atomic import atomic_path, atomic_write_text
from unhype.infotext import file_sha256

FORMAT = "unhype.eval_row"
VERSION = 1
REFERENCE = "base_others.safetensors"
BASE_SLOT = "base_model"
# the code whose change changes a row's numbers (hashed into every key)
_CODE = ("harness.py", "metrics.py", "methods.py", "prompts.py", "zero_shot.py", "extras.py")


@dataclass
class Slot:
    """One planned row: `id` (its file name), `key` (what determines its numbers), `label` (a
    name to report before it is built), `make` (builds the Method), `row` (set when reused)."""

    id: str
    key: dict
    label: str
    make: Callable
    row: dict | None = field(default=None, repr=False)


def path_identity(path) -> dict | None:
    """A cheap identity of a file or folder (no hashing of multi-GB models): its real path and,
    for every file under it, the size and modification time. Copying or touching the model
    changes it (the rows are then recomputed: the safe direction)."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return {"name": str(path)}  # a hub id, a pretrained tag, "toy"
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(p) if f != p else ''}\0{st.st_size}\0{st.st_mtime_ns}\n"
                      .encode())
    return {"path": str(p.resolve()), "files": len(files), "stat": digest.hexdigest()[:16]}


def sources_sha(folder: Path, names=None) -> str:
    """SHA-256 (16 hex) of the named .py files of a folder (all of them without `names`)."""
    digest = hashlib.sha256()
    files = [folder / n for n in names] if names else sorted(folder.glob("*.py"))
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def evaluation_code_sha() -> str:
    return sources_sha(Path(__file__).parent, _CODE)


def package_code_sha() -> str:
    """SHA-256 (16 hex) of every .py file of the unhype package: the sampler, the LoRA hooks,
    the gate floor and the backends make the images too, so a row made by other code is made
    again (the safe direction; --force is not needed after an upgrade)."""
    import unhype

    root = Path(unhype.__file__).parent
    digest = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def baselines_code_sha() -> str:
    """The baseline recipes (registry constants, ESD/SPM/UCE settings and training code)."""
    import unhype.baselines

    return sources_sha(Path(unhype.baselines.__file__).parent)


def differing(old: dict, new: dict) -> list[str]:
    """The keys whose values differ (dotted into nested dicts)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{d}" for d in differing(a, b)]
        elif a != b:
            out.append(k)
    return out


class RowStore:
    """`out/rows/`: read finished rows, write each new one atomically (main process only)."""

    def __init__(self, out_dir, write: bool = True):
        self.dir = Path(out_dir) / "rows"
        self.write = write

    def path(self, slot: Slot) -> Path:
        return self.dir / f"{slot.id}.json"

    def load(self, slot: Slot) -> tuple[dict | None, str | None]:
        """(stored row, None) when its key matches `slot.key`; (None, why not) otherwise
        (why is None when there is no row at all)."""
        path = self.path(slot)
        if not path.is_file():
            return None, None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            ok = data.get("format") == FORMAT and isinstance(data.get("row"), dict)
        except (OSError, ValueError):
            ok = False
        if not ok:
            return None, f"{path} is not a readable row file"
        if data.get("key") != slot.key:
            diff = differing(data.get("key") or {}, slot.key)
            return None, f"its settings changed ({', '.join(diff[:6]) or 'format'})"
        return {"name": data["name"], **data["row"]}, None

    def save(self, slot: Slot, name: str, row: dict) -> Path | None:
        if not self.write:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        body = {k: v for k, v in row.items() if k != "images"}
        data = {"format": FORMAT, "version": VERSION, "slot": slot.id, "name": name,
                "key": slot.key, "row": body}
        path = self.path(slot)
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")
        return path

    # --- the base model's other-class images (the paired-change reference) -----------------
    def save_reference(self, key: dict, images) -> None:
        if not self.write:
            return
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.dir / REFERENCE) as tmp:
            save_file({"others": images.detach().float().cpu().contiguous()}, str(tmp),
                      metadata={"format": FORMAT, "key": json.dumps(key, sort_keys=True)})

    def load_reference(self, key: dict):
        """The stored base-model images when stored under `key`; None otherwise."""
        from safetensors import safe_open

        path = self.dir / REFERENCE
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("key") != json.dumps(key, sort_keys=True):
                    return None
                return fh.get_tensor("others")
        except Exception:  # a damaged file: the base row is recomputed
            return None


def model_key(args, model: str) -> dict:
    """The model a run samples with (and a baseline trains on) and the options that change its
    numbers: its identity, config, prediction type, precision and storage, the device type."""
    import torch

    if model == "toy":
        from unhype.toy.model import weights_dir

        model_id = {"toy": path_identity(args.toy_weights or weights_dir())}
    else:
        model_id = path_identity(model)
    return {
        "model": model_id, "model_config": args.model_config,
        "v_parameterization": args.v_parameterization,
        "zero_terminal_snr": args.zero_terminal_snr, "mixed_precision": args.mixed_precision,
        "fp8_base": args.fp8_base, "nf4_base": args.nf4_base,
        "cache_text_encoder_outputs": args.cache_text_encoder_outputs,
        "device": torch.device(args.device).type,
    }


def run_key(args, model: str, ps, erased: list[str], generality, classifier) -> dict:
    """What determines every row of an `unhype eval` run (the method adds its own part): the
    model and its options, the prompt sets, seeds and counts, the classifier and the extra
    measurements, and the evaluation code. Not in it: --out, --keep_images, --hypernet and
    --baselines (each row's own), the number of processes (their numbers are one process's)."""
    import unhype

    return {
        **model_key(args, model), "steps": args.steps, "guidance": args.guidance,
        "prompt_set": {"name": Path(ps.path).name, "sha256": file_sha256(ps.path)[:16]},
        "erased": list(erased), "per_class": args.per_class, "generality": list(generality),
        "seed": args.seed, "batch_size": args.batch_size,
        "classifier": {"spec": args.classifier,
                       "description": getattr(classifier, "description", None),
                       "weights": path_identity(args.clip_weights),
                       "random": args.allow_random_classifier},
        "nudenet": args.nudenet, "fid_reference": path_identity(args.fid_reference),
        "fid_extractor": args.fid_extractor, "with_base": not args.no_base,
        "code": {"unhype": unhype.__version__, "evaluation": evaluation_code_sha(),
                 "package": package_code_sha()},
    }
