"""Trained baselines on disk, so `unhype eval` trains ESD-x, ESD-u and SPM once: `--out/trained/`.

These train for minutes (toy) to hours (SD) before their row's first image. As soon as training
ends their weights are written, atomically, to `trained/<name>.safetensors` with the key of
everything that determines the training (`training_key`) and a SHA-256 of the weights; then the
row's images are made. A Ctrl-C or a crash during those images loses the images, not the
training: the rerun loads the weights. So does a run whose rows differ only in how they are
evaluated (images per class, sampling steps, classifier, ...). A file whose key differs, that
cannot be read or whose weights fail their checksum is refused, with the reason, and the
baseline is trained again (the file replaced). An interrupted training keeps nothing: the rerun
trains from step 0. `--force` trains again whatever is stored.

`benchmarks/compare_methods.py` keeps its trained baselines the same way (one store per setting).
Under `accelerate launch` only the main process trains or loads a baseline; the others receive
its weights (`from_main_process`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from unhype.atomic import atomic_path
from unhype.evaluation.rows import differing, model_key, package_code_sha, sources_sha

FORMAT = "unhype.eval_trained_baseline"
VERSION = "1"


def trainer_data_sha() -> str:
    """The trainer's template and retained-prompt lists (not .py: outside the package hash)."""
    import unhype.trainer

    folder = Path(unhype.trainer.__file__).parent / "data"
    return sources_sha(folder, sorted(p.name for p in folder.glob("*.txt")))


def training_key(args, model: str, name: str, erased: list[str], seed: int) -> dict:
    """What determines a trained baseline's weights: its recipe (registry.training_settings:
    steps, seed, rank, lr, ...), the concepts, the model and its options, and the code."""
    from dataclasses import asdict

    import unhype
    from unhype.baselines.registry import training_settings

    key = {"method": name, "settings": asdict(training_settings(name, args.baseline_steps, seed)),
           "concepts": list(erased), **model_key(args, model),
           "code": {"unhype": unhype.__version__, "package": package_code_sha(),
                    "trainer_data": trainer_data_sha()}}
    return json.loads(json.dumps(key))  # as it reads back from a file (lists, not tuples)


def weights_sha(tensors: dict, meta: dict) -> str:
    """SHA-256 of the tensors and of the metadata that rebuilds the method (name, gate, ...)."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


class TrainedStore:
    """`out/trained/`: one file per trained baseline (written by the main process only).
    `saved` / `loaded`: the names written / loaded by this run."""

    def __init__(self, out_dir, write: bool = True):
        self.dir = Path(out_dir) / "trained"
        self.write = write
        self.saved: list[str] = []
        self.loaded: list[str] = []

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.safetensors"

    def save(self, name: str, key: dict, method) -> Path | None:
        from safetensors.torch import save_file

        from unhype.baselines.saved import to_tensors

        if not self.write:
            return None
        tensors, meta = to_tensors(method)
        meta = {**meta, "format": FORMAT, "version": VERSION,
                "key": json.dumps(key, sort_keys=True), "sha256": weights_sha(tensors, meta)}
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path(name)) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        self.saved.append(name)
        return self.path(name)

    def load(self, name: str, key: dict, unet):
        """(method, None) when the stored weights were trained under `key` and are intact;
        (None, why not) otherwise (why is None when nothing is stored)."""
        from safetensors import safe_open

        from unhype.baselines.layers import linear_layers
        from unhype.baselines.registry import TRAINED
        from unhype.baselines.saved import from_tensors

        path = self.path(name)
        if not path.is_file():
            return None, None
        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                    return None, f"{path} is not a trained-baseline file of this version"
                stored = json.loads(meta["key"])
                if stored != key:
                    diff = differing(stored, key)
                    return None, (f"{path} was trained with other settings "
                                  f"({', '.join(diff[:6]) or 'format'})")
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # noqa: BLE001 - any unreadable file is refused the same way
            return None, f"{path} cannot be read ({type(exc).__name__}: {exc})"
        own = {k: v for k, v in meta.items() if k not in ("format", "version", "key", "sha256")}
        if weights_sha(tensors, own) != meta.get("sha256"):
            return None, f"{path} is damaged (its weights do not match their SHA-256)"
        try:
            method = from_tensors(tensors, own, linear_layers(unet, TRAINED[name]))
        except (KeyError, TypeError, ValueError) as exc:
            return None, f"{path} does not fit this model ({exc})"
        self.loaded.append(name)
        return method, None


def load_or_train(store: TrainedStore, name: str, key: dict, train, unet, force: bool = False,
                  say=None):
    """The baseline `name` from `store` when stored under `key` (not with `force`), else
    `train()`ed and stored at once (its info gains `train_seconds`). `say(message)`: progress
    lines, to be prefixed with the tool's name (None: silent)."""
    say = say or (lambda message: None)
    if not force:
        method, why = store.load(name, key, unet)
        if method is not None:
            say(f"{name}: loaded its trained weights from {store.path(name)} "
                "(same training settings; not trained again; --force retrains)")
            return method
        if why:
            say(f"training {name} again: {why}")
    start = time.perf_counter()
    method = train()
    method.info = {**method.info, "train_seconds": round(time.perf_counter() - start, 1)}
    try:
        path = store.save(name, key, method)
    except OSError as exc:  # the row can still be made; only a rerun would train again
        say(f"{name}: could not keep its trained weights ({exc}); an interrupted run would "
            "train it again")
    else:
        if path is not None:
            say(f"{name}: trained weights kept in {path} (a rerun loads them)")
    return method


def from_main_process(dist, name: str, unet, obtain):
    """`obtain()` (load_or_train) in the main process only; every other process receives its
    weights, bit for bit (their metadata through `dist.tell`, the tensors through
    `dist.broadcast`), instead of training a copy of its own. A failure in the main process is
    told too: the others raise with its reason instead of waiting."""
    if dist.world == 1:
        return obtain()
    from unhype.baselines.layers import linear_layers
    from unhype.baselines.registry import TRAINED
    from unhype.baselines.saved import from_tensors, to_tensors
    from unhype.errors import UnHypeError

    word = f"trained/{name}"
    if dist.is_main:
        try:
            method = obtain()
            tensors, meta = to_tensors(method)
        except Exception as exc:
            dist.tell(word, json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
            raise
        dist.tell(word, json.dumps({"meta": meta, "names": sorted(tensors)}))
        dist.broadcast(tensors, sorted(tensors))
        return method
    head = json.loads(dist.told(word))
    if "error" in head:
        raise UnHypeError(f"{name}: the main process could not train or load it "
                          f"({head['error']})")
    tensors = dist.broadcast(None, head["names"])
    return from_tensors(tensors, head["meta"], linear_layers(unet, TRAINED[name]))
