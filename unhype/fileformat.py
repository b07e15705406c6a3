"""Hypernetwork `.safetensors` files: write atomically, read with validation and clear errors.

The schema (documented in docs/format.md) lives in the safetensors header's ``__metadata__``
(string values; structured ones are JSON). Nothing but safetensors is ever parsed: the header
is checked by hand first so that truncated, corrupt, pickled or zipped files get a specific
message before safetensors sees them.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load, save_file

from unhype import __version__
from unhype.atomic import atomic_path, check_output
from unhype.errors import UnHypeError
from unhype.families import get_family
from unhype.hypernet import HyperNetConfig, HyperNetwork, build_hypernet, is_whole_number

log = logging.getLogger("unhype")

FORMAT_NAME = "unhype.hypernetwork"
FORMAT_VERSION = 1
_MAX_HEADER = 100 * 1024 * 1024
_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
           "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class HypernetMeta:
    family: str
    embedding: dict  # {"source": ..., "dim": ...}
    config: HyperNetConfig
    concepts: list = field(default_factory=list)  # [{"target", "anchor", "synonyms", ...}]
    training: dict = field(default_factory=dict)
    created: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    history: list = field(default_factory=list)  # later edits: {date, by, tool, changed}

    def to_metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "unhype.format_version": str(self.format_version),
            "unhype.family": self.family,
            "unhype.embedding": json.dumps(self.embedding),
            "unhype.config": json.dumps(self.config.to_dict()),
            "unhype.concepts": json.dumps(self.concepts),
            "unhype.training": json.dumps(self.training),
            "unhype.created": json.dumps(self.created),
            **({"unhype.history": json.dumps(self.history)} if self.history else {}),
        }


@dataclass
class LoadedHypernet:
    path: Path
    hypernet: HyperNetwork
    meta: HypernetMeta

    @property
    def family(self):
        return get_family(self.meta.family)

    @property
    def gate_reference(self) -> float | None:
        """The concept-strength update norm the gate floor is relative to (unhype.gate_floor);
        None for files trained before it was stored."""
        from unhype.gate_floor import check_reference

        ref = self.meta.training.get("gate_reference")
        if ref is None:
            return None
        try:
            return check_reference(ref)
        except UnHypeError as exc:
            raise UnHypeError(f"{self.path}: training.{exc}") from None

    @property
    def gate_floor(self) -> float:
        """The floor the file was trained to be used with (`--gate_floor`; default 0.03)."""
        from unhype.gate_floor import DEFAULT_FLOOR, check_floor

        value = self.meta.training.get("gate_floor", DEFAULT_FLOOR)
        try:
            if isinstance(value, (str, bool)):  # a JSON number in the file, not "0.03"
                raise UnHypeError(f"gate_floor must be a number, got {value!r}")
            return check_floor(value)
        except UnHypeError as exc:
            raise UnHypeError(f"{self.path}: training.{exc}") from None

    @property
    def stored_saturate(self) -> bool:
        """The file's `gate_saturate` entry as stored (False without one)."""
        from unhype.gate_floor import check_saturate

        try:
            return check_saturate(self.meta.training.get("gate_saturate", False))
        except UnHypeError as exc:
            raise UnHypeError(f"{self.path}: training.{exc}") from None

    @property
    def saturate_ignored(self) -> str | None:
        """Why a stored `gate_saturate` is not applied (None: it is, or none is stored): a file
        trained in fields mode, which the trainer and `unhype stamp-floor` refuse to saturate,
        can still carry it when its metadata was edited by hand."""
        from unhype.gate_floor import saturate_refusal

        return saturate_refusal(self.meta.training.get("mode")) if self.stored_saturate else None

    @property
    def gate_saturate(self) -> bool:
        """Whether hosts raise every prompt above the floor to the concept's strength
        (`--gate_saturate`, unhype.gate_floor): the stored entry unless `saturate_ignored`."""
        return self.stored_saturate and self.saturate_ignored is None

    def generate(self, embeddings: torch.Tensor, floor: float | None = None,
                 saturate: bool | None = None):
        """LoRA factors for pooled embeddings [N, D], with the gate floor applied (`floor`:
        a fraction of `gate_reference`; None = the file's `gate_floor`, 0 = off; `saturate`:
        None = the file's `gate_saturate`)."""
        return self._floored(self.hypernet(embeddings), floor, saturate)

    def pick_readings(self, embeddings: torch.Tensor, owner: list[int], n: int):
        """For prompts read several ways (a long prompt and its windows: row k of `embeddings`
        reads prompt owner[k]): (every row's factors as `generate` gives them, per prompt the
        rows it gets: unhype.prompt_windows.combined_rows, ranked by the update before the
        floor, concepts told apart by the file's signatures). `stack_rows` sums them."""
        from unhype.prompt_windows import combined_rows, update_norms

        raw = self.hypernet(embeddings)
        cosines = self.signatures.cosines(raw) if self.signatures is not None else None
        applied = self._floored(raw, cosines=cosines)
        return applied, combined_rows(applied, owner, n, cosines, rank_by=update_norms(raw))

    def _floored(self, raw, floor: float | None = None, saturate: bool | None = None,
                 cosines=None):
        from unhype.gate_floor import apply_floor, check_floor

        f = self.gate_floor if floor is None else check_floor(floor)
        sat = self.gate_saturate if saturate is None else bool(saturate)
        return apply_floor(raw, self.gate_reference, f, sat, self.signatures, cosines)

    @property
    def signatures(self):
        """The concepts' updates by which a prompt's concept is named
        (unhype.concept_signatures), made by the current network once (kept while the
        network object is the same one); None for files that do not store them, or store
        fewer than two. Concepts it can never tell apart are logged as a warning when made."""
        from unhype.concept_signatures import ConceptSignatures, read_embeddings, same_way_text
        from unhype.probe import concept_references

        cached = self.__dict__.get("_signatures")
        if cached is not None and cached[0] is self.hypernet:
            return cached[1]
        try:
            embeddings = read_embeddings(self.meta.training, self.meta.config.embed_dim)
        except UnHypeError as exc:
            raise UnHypeError(f"{self.path}: {exc}") from None
        targets = {c.get("target") for c in self.meta.concepts if isinstance(c, dict)}
        foreign = [t for t in embeddings if t not in targets]
        if foreign:  # a signature of no concept here would name prompts after it
            raise UnHypeError(f"{self.path}: training.concept_embeddings names {foreign[:3]}, "
                              f"not among the file's concepts {sorted(map(str, targets))}")
        made = ConceptSignatures.of(self.hypernet, embeddings, concept_references(self.meta))
        self.__dict__["_signatures"] = (self.hypernet, made)
        for pair in made.same_way() if made is not None else ():
            log.warning("UnHype: %s: %s", self.path.name, same_way_text(*pair))
        return made



def atomic_save_safetensors(tensors: dict, path, metadata: dict[str, str]) -> None:
    """Write to a temp file in the target folder, then rename: never a half-written file."""
    path = check_output(path)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UnHypeError(f"refusing to write {path}: NaN/Inf in {bad[:3]}")
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)


def read_header(path) -> tuple[dict, dict]:
    """(metadata, tensor infos) of a safetensors file, with a specific error for each defect."""
    path = Path(path)
    if path.is_dir():
        raise UnHypeError(f"{path}: a folder, not a .safetensors file")
    if not path.is_file():
        raise UnHypeError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if head[:4] == b"PK\x03\x04":
            raise UnHypeError(f"{path}: is a zip archive (a PyTorch .pt/.ckpt pickle?), not "
                              "safetensors; UnHype loads only .safetensors")
        # a pickle starts with 0x80; so does a valid header length of 128 mod 256: decide by fit
        (header_len,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
        if head[:1] == b"\x80" and (header_len is None or 8 + header_len > size):
            raise UnHypeError(f"{path}: is a Python pickle, not safetensors; UnHype never "
                              "loads pickles")
        if len(head) < 8:
            raise UnHypeError(f"{path}: truncated ({size} bytes), not a safetensors file")
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise UnHypeError(f"{path}: truncated or not safetensors (header claims "
                              f"{header_len} bytes, file has {size})")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnHypeError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise UnHypeError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or \
            not all(isinstance(v, str) for v in metadata.values()):
        raise UnHypeError(f"{path}: corrupt safetensors header (__metadata__ must map names to "
                          "text)")
    data_len = size - 8 - header_len
    for name, info in header.items():
        try:
            start, stop = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
        except (KeyError, TypeError, ValueError):
            raise UnHypeError(f"{path}: corrupt entry for tensor {name!r} in header") from None
        whole = is_whole_number
        if not (whole(start) and whole(stop) and isinstance(dtype, str)
                and isinstance(shape, list) and all(whole(d) for d in shape)) or start > stop:
            raise UnHypeError(f"{path}: corrupt entry for tensor {name!r} in header (offsets, "
                              "dtype or shape of the wrong kind)")
        if stop > data_len:
            raise UnHypeError(f"{path}: truncated (tensor {name!r} ends at byte {stop} of "
                              f"{data_len} data bytes)")
        count = 1
        for d in shape:
            count *= d
        if dtype in _DTYPES and stop - start != count * _DTYPES[dtype]:
            raise UnHypeError(f"{path}: corrupt entry for tensor {name!r} (size mismatch)")
    return metadata, header


def _json_field(path, metadata, key, kind=dict, default=None):
    """Metadata entry `key` parsed as JSON and checked to be a `kind` (dict or list); `default`
    (a JSON text) when the entry is optional and absent."""
    if key not in metadata and default is None:
        raise UnHypeError(f"{path}: metadata lacks {key!r}; not an UnHype hypernetwork?")
    try:
        value = json.loads(metadata.get(key, default))
    except json.JSONDecodeError:
        raise UnHypeError(f"{path}: metadata {key!r} is not valid JSON") from None
    if not isinstance(value, kind):
        raise UnHypeError(f"{path}: metadata {key!r} is a JSON {type(value).__name__}, expected "
                          f"{'an object' if kind is dict else 'a list'}")
    return value


def _concepts(path, metadata) -> list[dict]:
    concepts = _json_field(path, metadata, "unhype.concepts", list, "[]")
    bad = [c for c in concepts if not isinstance(c, dict) or not isinstance(c.get("target"), str)]
    if bad:
        raise UnHypeError(f"{path}: metadata 'unhype.concepts' must list objects with a "
                          f"'target' text; found {str(bad[0])[:60]!r}")
    for c in concepts:
        synonyms = c.get("synonyms", [])
        if "anchor" in c and not isinstance(c["anchor"], str):
            problem = "'anchor' must be a text"
        elif not isinstance(synonyms, list) or not all(isinstance(x, str) for x in synonyms):
            problem = "'synonyms' must be a list of texts"
        else:
            continue
        raise UnHypeError(f"{path}: metadata 'unhype.concepts': concept {c['target'][:60]!r}: "
                          f"{problem}")
    return concepts


def read_meta(path) -> HypernetMeta:
    """Metadata only (fast: reads the header, not the tensors)."""
    metadata, _ = read_header(path)
    return _parse_meta(path, metadata)


def _parse_meta(path, metadata) -> HypernetMeta:
    if metadata.get("format") != FORMAT_NAME:
        kind = "a kohya LoRA" if any(k.startswith("ss_") for k in metadata) else "some other file"
        raise UnHypeError(f"{path}: not an UnHype hypernetwork (looks like {kind}); "
                          "a baked LoRA goes in a LoRA loader, not here")
    try:
        version = int(metadata.get("unhype.format_version", ""))
    except ValueError:
        raise UnHypeError(f"{path}: format version missing or not a number") from None
    if version < 1:
        raise UnHypeError(f"{path}: format version {version} does not exist (1 is the first)")
    if version > FORMAT_VERSION:
        raise UnHypeError(f"{path}: format version {version} is newer than this UnHype "
                          f"understands ({FORMAT_VERSION}); update UnHype")
    family_name = metadata.get("unhype.family")
    if not family_name:
        raise UnHypeError(f"{path}: metadata lacks 'unhype.family'")
    try:
        family = get_family(family_name)
    except UnHypeError as exc:
        raise UnHypeError(f"{path}: {exc}") from None
    embedding = _json_field(path, metadata, "unhype.embedding")
    config_dict = _json_field(path, metadata, "unhype.config")
    try:
        config = HyperNetConfig.from_dict(config_dict)
    except UnHypeError as exc:
        raise UnHypeError(f"{path}: {exc}") from None
    except (TypeError, KeyError) as exc:
        raise UnHypeError(f"{path}: malformed hypernetwork config ({exc})") from None
    if not isinstance(embedding.get("dim"), int) or isinstance(embedding.get("dim"), bool):
        raise UnHypeError(f"{path}: metadata 'unhype.embedding' needs a whole-number 'dim', "
                          f"got {embedding.get('dim')!r}")
    if embedding.get("dim") != config.embed_dim:
        raise UnHypeError(f"{path}: embedding dim {embedding.get('dim')} disagrees with the "
                          f"network's input dim {config.embed_dim}")
    if family.embedding.dim and embedding.get("dim") != family.embedding.dim:
        raise UnHypeError(f"{path}: embedding dim {embedding.get('dim')} does not fit family "
                          f"{family.name} ({family.embedding.source}, {family.embedding.dim})")
    return HypernetMeta(
        family=family.name, embedding=embedding, config=config,
        concepts=_concepts(path, metadata),
        training=_json_field(path, metadata, "unhype.training", dict, "{}"),
        created=_json_field(path, metadata, "unhype.created", dict, "{}"), format_version=version,
        history=_json_field(path, metadata, "unhype.history", list, "[]"))


def save_hypernet(path, hypernet: HyperNetwork, family: str, concepts=(), training=None,
                  embedding: dict | None = None) -> Path:
    fam = get_family(family)
    embedding = embedding or {"source": fam.embedding.source, "dim": hypernet.config.embed_dim}
    meta = HypernetMeta(
        family=fam.name, embedding=embedding, config=hypernet.config, concepts=list(concepts),
        training=dict(training or {}),
        created={"by": f"unhype {__version__}",
                 "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    state = {k: v.float() for k, v in hypernet.state_dict().items()}
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise UnHypeError(f"refusing to save {path}: NaN/Inf in {bad[:3]}")
    atomic_save_safetensors(state, path, meta.to_metadata())
    return Path(path)


def _expected_shapes(path, config: HyperNetConfig) -> dict[str, tuple]:
    """The tensor shapes `config` builds, from a network on the meta device: a config that
    claims a huge rank or width is compared with the file's tensors before anything is
    allocated."""
    try:
        return dict(_shapes_of(json.dumps(config.to_dict(), sort_keys=True)))
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
        raise UnHypeError(f"{path}: invalid hypernetwork config ({exc})") from None


@functools.lru_cache(maxsize=16)  # a host reloads the same few files: build each config once
def _shapes_of(config_json: str) -> tuple:
    with torch.device("meta"):
        network = build_hypernet(HyperNetConfig.from_dict(json.loads(config_json)))
    return tuple((k, tuple(v.shape)) for k, v in network.state_dict().items())


def load_hypernet(path, device="cpu") -> LoadedHypernet:
    """Load and fully validate a hypernetwork file (shapes, dtypes, finiteness)."""
    path = Path(path)
    metadata, infos = read_header(path)
    meta = _parse_meta(path, metadata)
    expected = _expected_shapes(path, meta.config)
    missing = sorted(set(expected) - set(infos))
    extra = sorted(set(infos) - set(expected))
    if missing:
        raise UnHypeError(f"{path}: missing tensor(s) {missing[:3]} ({len(missing)} in all)")
    if extra:
        raise UnHypeError(f"{path}: unexpected tensor(s) {extra[:3]} ({len(extra)} in all)")
    for name, shape in expected.items():
        if tuple(infos[name]["shape"]) != shape:
            raise UnHypeError(f"{path}: tensor {name!r} has shape {infos[name]['shape']}, "
                              f"expected {list(shape)}")
        if infos[name]["dtype"] not in ("F32", "F16", "BF16"):
            raise UnHypeError(f"{path}: tensor {name!r} has dtype {infos[name]['dtype']}, "
                              "expected a float type")
    try:
        # from bytes: safetensors' load_file keeps ~57 bytes per tensor for good (0.8.0), which
        # a web UI that reloads files for days would pile up; a hypernetwork is small
        state = safetensors_load(path.read_bytes())
    except Exception as exc:  # safetensors' own parse errors
        raise UnHypeError(f"{path}: unreadable safetensors data ({exc})") from None
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise UnHypeError(f"{path}: NaN/Inf values in {bad[:3]}")
    hypernet = build_hypernet(meta.config)  # its size is now the file's own tensors'
    hypernet.load_state_dict({k: v.float() for k, v in state.items()})
    hypernet.eval().requires_grad_(False)
    loaded = LoadedHypernet(path=path, hypernet=hypernet.to(device), meta=meta)
    loaded.gate_reference, loaded.gate_floor, loaded.gate_saturate  # malformed: fail here
    if loaded.saturate_ignored:
        log.warning("%s: its stored gate_saturate is ignored: %s (`unhype stamp-floor FILE -o "
                    "OUT --no-gate_saturate` clears it)", path, loaded.saturate_ignored)
    loaded.signatures
    return loaded


def save_with_training(loaded: LoadedHypernet, path, tool: str = "", **training) -> Path:
    """`loaded`'s file with `training` keys added to (or replacing) its training metadata, written
    atomically to `path` (which may be the file itself): the tensors as stored, bit for bit, and
    every other metadata entry unchanged. What changed, from what, by which `tool` and when is
    appended to the file's history (``unhype.history``), so the values the file was trained
    with stay on record."""
    metadata, _ = read_header(loaded.path)
    state = safetensors_load(loaded.path.read_bytes())
    old = loaded.meta.training
    changed = {k: [_on_record(k, old.get(k)), _on_record(k, v)]
               for k, v in training.items() if old.get(k) != v}
    history = list(loaded.meta.history)
    if changed:
        history.append({"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        "by": f"unhype {__version__}", "tool": tool, "changed": changed})
    metadata = {**metadata, "unhype.training": json.dumps({**old, **training}, allow_nan=False),
                "unhype.history": json.dumps(history, allow_nan=False)}
    atomic_save_safetensors(state, path, metadata)
    return Path(path)


def _on_record(key: str, value):
    """A training value as the history keeps it: concept signatures (thousands of numbers) by
    the concepts they are for."""
    from unhype.concept_signatures import KEY

    if key == KEY and isinstance(value, dict):
        return f"signatures of {', '.join(map(str, value))}"
    return value


def check_targets_in_model(loaded: LoadedHypernet, model, host: str = "diffusers"):
    """Resolve the file's targets in `model` ('diffusers' or 'ldm' naming); clear error if not."""
    from unhype.dynamic_lora import resolve_modules

    paths = host_paths(loaded.meta, host)
    dims = {t.name: (t.in_dim, t.out_dim) for t in loaded.meta.config.targets}
    return resolve_modules(model, paths, dims)


def host_paths(meta: HypernetMeta, host: str = "diffusers") -> dict:
    """Canonical name -> HostPath in a host's naming, for every target of the file."""
    from unhype.naming import host_path

    family = get_family(meta.family)
    return {t.name: host_path(family, t.path, host, t.out_dim) for t in meta.config.targets}
