"""Resumable training checkpoints: one safetensors file each, JSON in its header, no pickle.

Tensors: the hypernetwork's state (`hypernet.*`), both Adam states (`optim.<name>.<param
index>.<key>`) and the RNG states (`rng.*` as uint8). Header metadata: format tag, step, a
fingerprint of everything that shapes the network and its inputs (so `--resume` from another
run's or a foreign file fails clearly, naming what differs), the optimisers' param groups and
the JSON-able rest. Files are written
atomically (temp file + rename); older ones beyond `keep` are deleted after the new one exists.

Nothing in a checkpoint depends on the number of processes that wrote it (`accelerate launch`):
the network and Adam states are the same in every process, `rng.gen` is the one global
generator every process shares, and per-process randomness is derived from (seed, step, process
index) (unhype/trainer/distributed.py), so a checkpoint resumes with any process count. The count that
wrote it is recorded in `info.processes`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from unhype.errors import UnHypeError
from unhype.fileformat import atomic_save_safetensors, read_header

FORMAT = "unhype.train_checkpoint"
_NAME = re.compile(r"^step-(\d+)\.safetensors$")


def fingerprint(inputs: dict) -> str:
    """Digest of what shapes a run (`inputs`: {"net": hypernetwork config, "model", ...}); a
    checkpoint resumes only a run with the same. The inputs are stored beside it."""
    data = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def model_identity(spec) -> str:
    """The model as compared on resume: a local path resolved (`./m`, `/abs/m/` and `/abs/m`
    are one model), anything else (a hub id, `toy`) as given."""
    text = str(spec)
    return os.path.realpath(text) if os.path.exists(text) else text


# fingerprint input -> the option that sets it (net.* are HyperNetConfig fields)
_OPTION_OF = {"model": "pretrained_model_name_or_path", "family": "model family",
              "concepts": "concepts", "mode": "mode", "seed": "seed",
              "latent_cache": "latent_cache", "net.variant": "variant", "net.rank": "network_dim",
              "net.hidden": "network_hidden", "net.head_hidden": "network_head_hidden",
              "net.hyper_steps": "hyper_steps", "net.alpha_base": "network_alpha",
              "net.targets": "target layers (target_preset)", "net.seed": "seed",
              "net.embed_dim": "embedding size (another model)"}
_SHOWN = {"model", "family", "mode", "seed", "latent_cache", "net.variant", "net.rank",
          "net.hidden", "net.head_hidden", "net.hyper_steps", "net.alpha_base", "net.seed",
          "net.embed_dim"}


def _flat(inputs: dict) -> dict:
    out = {k: v for k, v in inputs.items() if k != "net"}
    out.update({f"net.{k}": v for k, v in inputs.get("net", {}).items()})
    return json.loads(json.dumps(out, default=str))


def _differences(metadata: dict, inputs: dict) -> list[str]:
    """The options whose recorded value differs from this run's (none known for a
    checkpoint from before the inputs were recorded)."""
    try:
        recorded = _flat(json.loads(metadata["fingerprint_inputs"]))
    except (KeyError, TypeError, ValueError, AttributeError):
        return []
    now = _flat(inputs)
    out = []
    for key in sorted(set(recorded) | set(now)):
        if recorded.get(key) != now.get(key):
            name = _OPTION_OF.get(key, key)
            shown = f" ({recorded.get(key)} in the checkpoint, {now.get(key)} now)" \
                if key in _SHOWN else ""
            if f"{name}{shown}" not in out:
                out.append(f"{name}{shown}")
    return out


def recorded_config(metadata: dict) -> dict:
    try:
        config = json.loads(metadata.get("info", "")).get("config", {})
    except (ValueError, AttributeError):
        return {}
    return config if isinstance(config, dict) else {}


def _legacy_match(metadata: dict, inputs: dict) -> bool:
    """A checkpoint from before the inputs were recorded: its digest also covered the model
    path as typed and the batch size."""
    config = recorded_config(metadata)
    model, batch = config.get("pretrained_model_name_or_path"), config.get("train_batch_size")
    if model is None or model_identity(model) != inputs.get("model"):
        return False
    return fingerprint({**inputs, "model": str(model), "batch": batch}) == \
        metadata.get("fingerprint")


def _optim_tensors(name: str, optimiser: torch.optim.Optimizer):
    state = optimiser.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}.{pid}.{key}"] = value.detach().clone()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(folder: Path, step: int, hypernet, optimisers: dict, rng: dict,
                    inputs: dict, info: dict, keep: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"hypernet.{k}": v.detach().float() for k, v in hypernet.state_dict().items()}
    meta_optim = {}
    for name, optimiser in optimisers.items():
        t, m = _optim_tensors(name, optimiser)
        tensors.update(t)
        meta_optim[name] = m
    for key, value in rng.items():
        tensors[f"rng.{key}"] = value
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UnHypeError(f"refusing to checkpoint NaN/Inf values ({bad[:3]})")
    metadata = {"format": FORMAT, "step": str(step), "fingerprint": fingerprint(inputs),
                "fingerprint_inputs": json.dumps(inputs, sort_keys=True, default=str),
                "optimisers": json.dumps(meta_optim), "info": json.dumps(info, default=str)}
    path = checkpoint_path(folder, step)
    atomic_save_safetensors(tensors, path, metadata)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:07d}.safetensors"


def set_aside(folder: Path, paths: list[Path]) -> Path:
    """Move an earlier run's checkpoints into a subfolder of `folder`, where neither this run's
    pruning nor `--resume <folder>` looks (returns it)."""
    import time

    aside = folder / f"earlier-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while aside.exists():
        n += 1
        aside = folder / f"earlier-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    aside.mkdir(parents=True)
    for path in paths:
        path.replace(aside / path.name)
    return aside


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def find_checkpoint(spec: str, default_folder: Path) -> Path:
    """`--resume` value -> checkpoint file: a file, a checkpoints folder, an output folder."""
    path = Path(spec)
    if path.is_dir():
        for folder in (path, path / "checkpoints"):
            found = list_checkpoints(folder)
            if found:
                return found[-1]
        raise UnHypeError(f"--resume {path}: no checkpoint (step-*.safetensors) in it")
    if not path.is_file():
        raise UnHypeError(f"--resume {path}: no such file or folder")
    return path


def check_not_finished(path: Path, max_steps: int) -> None:
    """Refuse, before any model or cache is built, a checkpoint that has no step left to
    train (malformed files are left to load_checkpoint)."""
    try:
        metadata, _ = read_header(path)
    except UnHypeError:
        return
    step = metadata.get("step", "")
    if metadata.get("format") == FORMAT and step.isdigit() and int(step) >= max_steps:
        raise UnHypeError(f"--resume {path}: the checkpoint is at step {int(step)}, already at "
                          f"--max_train_steps {max_steps}: nothing left to train (its run wrote "
                          "its result then); give a larger --max_train_steps to train on")


def load_checkpoint(path: Path, inputs: dict, hypernet=None):
    """(step, tensors, metadata) of a checkpoint, after checking it belongs to this run (its
    fingerprint against `inputs`') and that its contents are whole (tensor shapes against
    `hypernet`'s, when given)."""
    try:
        metadata, _ = read_header(path)
    except UnHypeError as exc:
        raise UnHypeError(f"--resume: {exc}") from None
    if metadata.get("format") != FORMAT:
        what = "an UnHype hypernetwork (a finished result)" if metadata.get("format") == \
            "unhype.hypernetwork" else "not an UnHype training checkpoint"
        raise UnHypeError(f"--resume {path}: {what}; give a checkpoint from "
                          "<output_dir>/checkpoints")
    same = metadata.get("fingerprint") == fingerprint(inputs)
    if not same and not _legacy_match(metadata, inputs):
        differ = _differences(metadata, inputs)
        what = "fingerprint mismatch: " + ("these options differ: " + "; ".join(differ) if differ
                                           else "another model, targets, network shape, "
                                           "concepts, mode, seed or batch size")
        raise UnHypeError(f"--resume {path}: the checkpoint comes from another run ({what}); "
                          "resume with the options it was made with")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors' own parse errors
        raise UnHypeError(f"--resume {path}: corrupt checkpoint (unreadable data: {exc})") \
            from None
    problem = _checkpoint_problem(tensors, metadata, hypernet)
    if problem:
        raise UnHypeError(f"--resume {path}: corrupt checkpoint ({problem})")
    return int(metadata["step"]), tensors, metadata


def _checkpoint_problem(tensors: dict, metadata: dict, hypernet) -> str | None:
    """What is wrong with a checkpoint's contents (None: nothing): its step, optimiser
    record, network tensors (against `hypernet`'s, when given), RNG states, finiteness."""
    step = metadata.get("step", "")
    if not step.isdigit():
        return f"step {step!r} is not a whole number"
    try:
        optim = json.loads(metadata.get("optimisers", ""))
    except json.JSONDecodeError:
        return "its optimiser record is not valid JSON"
    if not isinstance(optim, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("scalars"), dict)
            and isinstance(v.get("param_groups"), list) for v in optim.values()):
        return "its optimiser record is malformed"
    net = {k[len("hypernet."):]: v for k, v in tensors.items() if k.startswith("hypernet.")}
    if hypernet is not None:
        expected = {k: tuple(v.shape) for k, v in hypernet.state_dict().items()}
        missing = sorted(set(expected) - set(net))
        if missing:
            return f"network tensor(s) {missing[:3]} missing"
        wrong = [k for k, shape in expected.items() if tuple(net[k].shape) != shape]
        if wrong:
            return f"network tensor {wrong[0]!r} has shape {list(net[wrong[0]].shape)}, " \
                   f"expected {list(expected[wrong[0]])}"
    not_float = [k for k, v in tensors.items()
                 if not k.startswith("rng.") and not v.is_floating_point()]
    if not_float:
        return f"tensor {not_float[0]!r} is {tensors[not_float[0]].dtype}, expected floats"
    for key in ("rng.gen", "rng.torch"):
        if key not in tensors or tensors[key].dtype != torch.uint8:
            return f"RNG state {key!r} missing or not bytes"
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        return f"NaN/Inf values in {bad[:3]}"
    return None


def restore(tensors: dict, metadata: dict, hypernet, optimisers: dict) -> dict:
    """Load network + optimiser states; returns the RNG tensors."""
    net = {k[len("hypernet."):]: v for k, v in tensors.items() if k.startswith("hypernet.")}
    try:
        hypernet.load_state_dict(net)
        _restore_optimisers(tensors, metadata, optimisers)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise UnHypeError(f"--resume: corrupt checkpoint ({type(exc).__name__}: "
                          f"{str(exc)[:200]})") from None
    return {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}


def _restore_optimisers(tensors: dict, metadata: dict, optimisers: dict) -> None:
    meta_optim = json.loads(metadata["optimisers"])
    for name, optimiser in optimisers.items():
        saved = meta_optim[name]
        state: dict = {}
        prefix = f"optim.{name}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                pid, field = key[len(prefix):].split(".", 1)
                state.setdefault(int(pid), {})[field] = value
        for key, value in saved["scalars"].items():
            pid, field = key.split(".", 1)
            state.setdefault(int(pid), {})[field] = value
        optimiser.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
