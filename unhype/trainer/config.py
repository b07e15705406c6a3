"""Training configuration: kohya-style flags, a TOML file (`--config_file`), flags win.

Precedence: built-in defaults < TOML file < command-line flags. TOML tables are flattened (as
sd-scripts does), except `concepts`, which may be an inline array of tables. Every option is
declared once in OPTIONS; `validate()` checks values before anything is loaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from unhype.errors import UnHypeError
from unhype.presets import presets_help

# name, type, default, help. Names shared with kohya's sd-scripts keep kohya's spelling.
OPTIONS: list[tuple[str, type, object, str]] = [
    # model (kohya)
    ("pretrained_model_name_or_path", str, None, "diffusers folder, single-file .safetensors "
     "(A1111 / ComfyUI checkpoint) or 'toy'"),
    ("model_family", str, "auto", "auto | sd1 | sd2 | sdxl | flux | toy | toy_flux"),
    ("model_config", str, None, "config of a single-file checkpoint: a local diffusers folder "
     "of the same architecture, or a built-in one: sd15, sd2-v (768-v SD 2.x), sd2-base (512 "
     "SD 2.x), sdxl-base, sdxl-v (default: the one for the checkpoint's family and what it "
     "predicts, read from the file as ComfyUI and Forge read it)"),
    ("v_parameterization", bool, False, "the model predicts v (SD2 768-v), whatever its "
     "scheduler config says"),
    ("zero_terminal_snr", bool, False, "the model was trained on a noise schedule rescaled to "
     "zero terminal SNR (v-prediction only; a single file's ztsnr key sets it)"),
    ("mixed_precision", str, "no", "no | fp16 | bf16: dtype of the frozen base model, passed "
     "to accelerate's Accelerator (the hypernetwork always trains in fp32)"),
    ("gradient_accumulation_steps", int, 1, "accelerate's gradient accumulation: each "
     "optimiser step averages this many batches of train_batch_size (and of retained prompts)"),
    ("gradient_checkpointing", bool, False, "recompute UNet activations in backward"),
    ("fp8_base", bool, False, "keep the frozen denoiser's linear weights in float8 (e4m3), "
     "each layer upcast to the --mixed_precision dtype for its forward; norm, modulation and "
     "convolution layers stay as they are (FLUX.1-dev 22.2 -> 14.1 GiB); diffusers >= 0.33; "
     "unhype/trainer/memory.py"),
    ("nf4_base", bool, False, "keep the same linear weights in 4-bit NF4 instead (bitsandbytes "
     "Linear4bit, QLoRA's format; FLUX.1-dev 22.2 -> ~10.2 GiB), each computed in the "
     "--mixed_precision dtype; needs bitsandbytes; trained against the 4-bit-rounded model"),
    ("cache_text_encoder_outputs", bool, False, "after the prompts are encoded (once, before "
     "the first step) keep the text encoders in CPU memory, off the GPU (FLUX's CLIP-L + "
     "T5-XXL: 9.1 GiB); they come back only for sample grids and the saved file's gate "
     "reference"),
    ("xformers", bool, False, "memory-efficient attention with xformers (if installed)"),
    ("sdpa", bool, False, "PyTorch scaled-dot-product attention (the default)"),
    ("device", str, "auto", "auto | cpu | cuda | cuda:N | mps"),
    ("cpu_threads", int, 0, "torch intra-op threads on CPU (0: torch's default; 1 avoids "
     "stalls on a busy machine)"),
    ("resolution", int, None, "training/sample image size in pixels (default: the model's)"),
    # output (kohya)
    ("output_dir", str, "output", "folder for the hypernetwork, checkpoints, logs, grids"),
    ("output_name", str, "unhype", "file name stem of the hypernetwork"),
    ("save_model_as", str, "safetensors", "only safetensors"),
    ("save_every_n_steps", int, 0, "every N steps write a usable hypernetwork "
     "<output_name>-stepNNNNNNNN.safetensors and a resume checkpoint (0: only at the end)"),
    ("save_last_n_checkpoints", int, 2, "keep this many checkpoints, and the step "
     "hypernetworks of those steps (0: keep all)"),
    ("sample_every_n_steps", int, 0, "before/after sample grids every N steps (0: end only)"),
    ("sample_prompts", str, None, "text file, one prompt a line, for the sample grids "
     "(default: each concept's prompt, its synonyms and two retained prompts)"),
    ("sample_steps", int, 25, "DDIM steps of the sample grids"),
    ("sample_seeds", int, 2, "images per prompt in the sample grids"),
    ("resume", str, None, "checkpoint file, checkpoints folder or output folder to continue "
     "from (a folder: its last checkpoint)"),
    ("logging_dir", str, None, "folder of the JSONL loss log (default: output_dir)"),
    # network and optimisation (kohya names)
    ("network_dim", int, 1, "LoRA rank r"),
    ("network_alpha", float, None, "LoRA alpha; the hypernet's A is scaled by "
     "network_alpha / network_dim (default: network_dim, i.e. 1)"),
    ("network_hidden", int, None, "hypernetwork MLP width (default 100 per_layer, 256 shared)"),
    ("network_head_hidden", int, 64, "shared variant: per-layer code width"),
    ("learning_rate", float, 1e-4, "Adam lr of the removal optimiser"),
    ("retain_learning_rate", float, None, "Adam lr of the retention optimiser (default: "
     "learning_rate)"),
    ("max_train_steps", int, 1000, "training steps"),
    ("lr_scheduler", str, "constant", "schedule of both learning rates (diffusers' "
     "get_scheduler, kohya's names): constant | constant_with_warmup | linear | cosine | "
     "cosine_with_restarts | polynomial"),
    ("lr_warmup_steps", int, 0, "warm-up steps of the learning-rate schedule (not with "
     "constant: use constant_with_warmup)"),
    ("lr_scheduler_num_cycles", int, 1, "cosine_with_restarts: number of cosine cycles (kohya)"),
    ("lr_scheduler_power", float, 1.0, "polynomial: power of the decay (1: linear; kohya)"),
    ("train_batch_size", int, 1, "target prompts per step: the global batch, split evenly "
     "over the processes of `accelerate launch`"),
    ("seed", int, 42, "seed of everything random (hypernet init, prompts, noise)"),
    # UnHype's own
    ("concepts", str, None, "concept file (TOML/YAML/CSV/TXT) or comma-separated targets"),
    ("anchor", str, None, "anchor for targets given on the command line (default '')"),
    ("template_set", str, None, "template set for command-line targets: objects | people | "
     "styles | nudity | toy | a text file"),
    ("retain_prompts", str, None, "retained prompts: builtin sets 'cifar100', 'captions', "
     "'toy' (comma-separated) and/or text/CSV files (default: cifar100,captions; toy: toy)"),
    ("composite_prompts", int, 0, "per concept, this many extra training prompts that name "
     "it beside a retained prompt ('a red circle, a blue heart'), anchored to the retained "
     "part alone: the concept stays erased when a prompt also names other things (0: off)"),
    ("retain_batch_size", int, 64, "retained prompts per retention step"),
    ("retain_weight", float, 1.0, "multiplies the retention loss"),
    ("eta", float, 1.0, "ESD guidance eta: target = e_anchor - eta (e_target - e_anchor)"),
    ("hyper_steps", int, 300, "T, hyper steps of the Hypernet-Fields trajectory"),
    ("fields_lambda", float, 1e-4, "lambda: one hyper step = one SGD step of this size"),
    ("variant", str, "per_layer", "per_layer (the paper's) | shared (compact)"),
    ("mode", str, "fields", "fields (the paper's Hypernet-Fields loss) | direct (ESD through "
     "H at s = T)"),
    ("target_preset", str, None, f"target layers, per family: {presets_help()}"),
    ("ddim_steps", int, 50, "DDIM steps of the partial sampling that makes z_t"),
    ("guidance_scale", float, None, "CFG scale of that sampling (default: model's, 7.5 SD)"),
    ("latent_cache", int, 0, "0: sample z_t fresh every step (paper); N > 0: sample N full "
     "trajectories per prompt once and reuse all their steps (same distribution, far cheaper)"),
    ("adversarial_eps", float, 0.0, "adversarial gate training: the removal loss reads the "
     "pooled embedding within this relative L2 distance of each target prompt that most "
     "weakens the generated LoRA (0: off; unhype/trainer/adversary.py)"),
    ("adversarial_steps", int, 3, "PGD steps of that search (hypernetwork only, no UNet pass)"),
    ("adversarial_fraction", float, 1.0, "share of each removal batch's target prompts replaced "
     "by their worst case; the rest stay clean, so the prompts themselves are still trained on"),
    ("adversarial_loss", str, "removal", "removal: the removal loss reads the worst case | "
     "consistency: the removal loss reads the clean prompt and a second term pulls the model's "
     "prediction under the worst case's LoRA to the clean prompt's (TRADES-style; "
     "unhype/trainer/adversary.py)"),
    ("consistency_weight", float, 1.0, "weight of that consistency term (mean squared "
     "difference of the model's predictions, the ESD loss's units)"),
    ("gate_floor", float, 0.03, "stored in the file: hosts give a prompt whose update is under "
     "this fraction of the concepts' own none, full from twice that (unhype/gate_floor.py; 0: "
     "off). fields mode leaves unrelated prompts ~13% on the toy: raise it there"),
    ("gate_saturate", bool, False, "stored in the file: hosts raise every prompt above the "
     "floor to the concepts' own update strength (unhype/gate_floor.py): holds erasure when "
     "an attack weakens the update; direct mode only (fields mode leaves unrelated prompts above "
     "the floor)"),
    ("probe_lambda", str, None, "comma-separated lambdas: run T plain SGD steps on one "
     "concept's LoRA with each, print the ESD loss reached, and exit (choose fields_lambda)"),
    ("log_every", int, 10, "loss-log and progress-bar interval"),
    ("eval", bool, False, "toy only: measure erasure with the judge after training"),
    ("eval_images", int, 24, "toy eval: images per class/synonym"),
]

BOOL_FLAGS = {name for name, typ, _, _ in OPTIONS if typ is bool}
CHOICES = {
    "model_family": ("auto", "sd1", "sd2", "sdxl", "toy", "flux", "toy_flux"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "save_model_as": ("safetensors",),
    "variant": ("per_layer", "shared"),
    "mode": ("fields", "direct"),
    "adversarial_loss": ("removal", "consistency"),
    "lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine",
                     "cosine_with_restarts", "polynomial"),
}


@dataclass
class TrainConfig:
    values: dict = field(default_factory=dict)
    concept_entries: list | None = None  # inline [[concepts]] from TOML
    config_file: str | None = None

    def __getattr__(self, name):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    def to_dict(self) -> dict:
        out = dict(self.values)
        if self.concept_entries is not None:
            out["concepts_inline"] = self.concept_entries
        return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config_file", help="TOML file of options (flags override it)")
    for name, typ, default, text in OPTIONS:
        shown = f"{text} [default: {default}]" if default not in (None, False) else text
        shown = shown.replace("%", "%%")  # argparse formats help with %: "3%" is not a format
        if typ is bool:
            # --flag / --no-flag: a flag can switch off what the config file switched on
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None,
                                help=shown)
        else:
            parser.add_argument(f"--{name}", type=typ, default=None, help=shown)


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def find_config_file(path: str) -> Path:
    """`path`, or the shipped config of that name when `path` is one of the repository-relative
    names the docs use (``unhype/trainer/configs/toy_demo.toml``; ``trainer/configs/...`` before
    the trainer moved into the package) and that file is not there (a pip install, another
    folder)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = SHIPPED_CONFIGS / p.name
    if p.parent.as_posix() in (".", "configs", "trainer/configs", "unhype/trainer/configs") and shipped.is_file():
        return shipped
    names = ", ".join(sorted(c.name for c in SHIPPED_CONFIGS.glob("*.toml")))
    raise UnHypeError(f"--config_file {p}: no such file (shipped configs: {names})")


def _read_toml(path: str) -> dict:
    p = find_config_file(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UnHypeError(f"--config_file {p}: not valid TOML ({exc})") from None
    flat = {}

    def walk(table):
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value)
            else:
                flat[key] = value
    walk({k: v for k, v in data.items() if k != "concepts" or not isinstance(v, list)})
    if isinstance(data.get("concepts"), list):
        flat["concepts"] = data["concepts"]
    return flat


# Input files a TOML file names by a relative path are looked for next to it first, then in the
# working directory; outputs (output_dir, logging_dir) are relative to the working directory.
TOML_INPUTS = ("pretrained_model_name_or_path", "model_config", "concepts", "sample_prompts",
               "template_set", "resume")
TOML_INPUT_LISTS = ("retain_prompts",)  # comma-separated: each item on its own


def _next_to(base: Path, value: str) -> str:
    from unhype.trainer.concepts import could_be_path

    if not value.strip() or not could_be_path(value) or Path(value).is_absolute():
        return value
    found = base / value
    return str(found) if found.exists() else value


def _inputs_next_to(toml: dict, concept_entries: list | None, base: Path) -> None:
    """The one rule for a TOML file's relative input paths, in place (TOML_INPUTS)."""
    for key in TOML_INPUTS:
        if isinstance(toml.get(key), str):
            toml[key] = _next_to(base, toml[key])
    for key in TOML_INPUT_LISTS:
        if isinstance(toml.get(key), str):
            toml[key] = ",".join(_next_to(base, v.strip()) for v in toml[key].split(","))
    for entry in concept_entries or []:  # [[concepts]] tables: their template files
        for key in ("templates", "template_set"):
            if isinstance(entry.get(key), str):
                entry[key] = _next_to(base, entry[key])


def resolve(args: argparse.Namespace | dict) -> TrainConfig:
    """Defaults < TOML (--config_file) < flags given on the command line; then validated."""
    from unhype.trainer.concepts import could_be_path

    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    values = {name: default for name, _, default, _ in OPTIONS}
    known = set(values)
    concept_entries = None
    config_file = given.get("config_file")
    if config_file:
        toml = _read_toml(config_file)
        unknown = sorted(set(toml) - known)
        if unknown:
            raise UnHypeError(f"--config_file {config_file}: unknown option(s) {unknown}")
        if isinstance(toml.get("concepts"), list):
            entries = toml.pop("concepts")
            concept_entries = [e if isinstance(e, dict) else {"target": e} for e in entries]
        _inputs_next_to(toml, concept_entries, find_config_file(config_file).parent)
        values.update(toml)
    for name in known:
        if given.get(name) is not None:
            values[name] = given[name]
            if name == "concepts":
                concept_entries = None
    cfg = TrainConfig(values=values, concept_entries=concept_entries, config_file=config_file)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    v = cfg.values
    types = {name: typ for name, typ, _, _ in OPTIONS}
    problems = []
    for name, typ in types.items():
        value = v[name]
        if value is None:
            continue
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            v[name] = value = float(value)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            problems.append(f"{name} must be {typ.__name__}, got {value!r}")
    for name, typ in types.items():
        if typ is float and isinstance(v[name], float) and not math.isfinite(v[name]):
            problems.append(f"{name} must be a finite number, got {v[name]}")
    for name, options in CHOICES.items():
        if v[name] not in options:
            problems.append(f"{name} must be one of {options}, got {v[name]!r}")
    for name in ("network_dim", "max_train_steps", "train_batch_size", "hyper_steps",
                 "ddim_steps", "retain_batch_size", "sample_steps", "sample_seeds", "log_every",
                 "eval_images", "gradient_accumulation_steps", "adversarial_steps",
                 "network_hidden", "network_head_hidden", "lr_scheduler_num_cycles"):
        if isinstance(v[name], int) and v[name] < 1:
            problems.append(f"{name} must be >= 1, got {v[name]}")
    for name in ("save_every_n_steps", "sample_every_n_steps", "latent_cache", "lr_warmup_steps",
                 "save_last_n_checkpoints", "composite_prompts"):
        if isinstance(v[name], int) and v[name] < 0:
            problems.append(f"{name} must be >= 0, got {v[name]}")
    for name in ("learning_rate", "retain_learning_rate", "fields_lambda", "consistency_weight",
                 "network_alpha", "lr_scheduler_power"):
        if isinstance(v[name], float) and not v[name] > 0:
            problems.append(f"{name} must be > 0, got {v[name]}")
    for name in ("retain_weight", "guidance_scale"):  # negative: rewards damaging the rest
        if isinstance(v[name], float) and not v[name] >= 0:
            problems.append(f"{name} must be >= 0, got {v[name]}")
    if isinstance(v["adversarial_eps"], float) and not 0 <= v["adversarial_eps"] < 2:
        problems.append(f"adversarial_eps must be in [0, 2), got {v['adversarial_eps']}")
    if isinstance(v["adversarial_fraction"], float) and not 0 < v["adversarial_fraction"] <= 1:
        problems.append(f"adversarial_fraction must be in (0, 1], got "
                        f"{v['adversarial_fraction']}")
    if isinstance(v["gate_floor"], float):
        from unhype.gate_floor import check_floor  # the bound the hosts apply

        try:
            check_floor(v["gate_floor"])
        except UnHypeError as exc:
            problems.append(str(exc).replace("gate floor", "gate_floor", 1))
    problems += _check_places(v) + _check_schedule(v)
    if v["fp8_base"] is True and v["nf4_base"] is True:
        problems.append("fp8_base and nf4_base are two storages of the same weights; pick one")
    if v["nf4_base"] is True and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("nf4_base needs bitsandbytes: pip install bitsandbytes (or unhype[nf4])")
    if v["gate_saturate"] is True:
        from unhype.gate_floor import saturate_refusal

        floor = v["gate_floor"] if isinstance(v["gate_floor"], float) else None
        refusal = saturate_refusal(v["mode"], floor)
        if refusal:
            problems.append(refusal)
    if problems:
        raise UnHypeError("invalid training options: " + "; ".join(problems))
    if v["retain_learning_rate"] is None:
        v["retain_learning_rate"] = v["learning_rate"]
    if v["network_alpha"] is None:
        v["network_alpha"] = float(v["network_dim"])
    if v["xformers"] and v["sdpa"]:
        raise UnHypeError("--xformers and --sdpa exclude each other; pick one")


def _check_schedule(v: dict) -> list[str]:
    """What diffusers' schedules would ignore or reject once training starts."""
    problems = []
    if v["lr_scheduler"] == "constant" and isinstance(v["lr_warmup_steps"], int) \
            and v["lr_warmup_steps"] > 0:  # kohya refuses it too
        problems.append(f"lr_scheduler constant has no warm-up (lr_warmup_steps "
                        f"{v['lr_warmup_steps']}); use lr_scheduler constant_with_warmup, or "
                        "lr_warmup_steps 0")
    if v["lr_scheduler"] == "polynomial":  # it decays to diffusers' lr_end, 1e-7
        low = [n for n in ("learning_rate", "retain_learning_rate")
               if isinstance(v[n], float) and v[n] <= 1e-7]
        if low:
            problems.append(f"lr_scheduler polynomial decays to 1e-7: {low[0]} must be above it")
    return problems


def _check_output_name(name) -> str | None:
    """A file name stem in output_dir: not empty (a hidden '.safetensors'), no folders."""
    if not isinstance(name, str):
        return None  # the type check reports it
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name \
            or os.sep in name or "\0" in name:
        return (f"output_name must be a plain file name stem (no folders, not empty), got "
                f"{name!r}; put folders in output_dir")
    return None


def check_device(name) -> str | None:
    """Why `name` is not a device the trainer and `unhype eval` take (None: it is)."""
    if isinstance(name, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        return None
    return f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}"


def _check_places(v: dict) -> list[str]:
    """Devices, sizes, numbers and paths that would otherwise fail once the model is loaded."""
    problems = [p for p in [check_device(v["device"]), _check_output_name(v["output_name"])] if p]
    if isinstance(v["cpu_threads"], int) and v["cpu_threads"] < 0:
        problems.append(f"cpu_threads must be >= 0 (0: torch's default), got {v['cpu_threads']}")
    if isinstance(v["resolution"], int):
        # the VAE downscales 8x; FLUX packs 2x2 latents into one token
        step = 16 if v["model_family"] in ("flux", "toy_flux") else 8
        if v["resolution"] < step or v["resolution"] % step:
            problems.append(f"resolution must be a positive multiple of {step}, got "
                            f"{v['resolution']}")
    if isinstance(v["probe_lambda"], str):
        try:
            lambdas = [float(x) for x in v["probe_lambda"].split(",")]
        except ValueError:
            lambdas = []
        if not lambdas or not all(math.isfinite(x) and x > 0 for x in lambdas):
            problems.append("probe_lambda must be comma-separated positive numbers (e.g. "
                            f"1e-4,1e-3), got {v['probe_lambda']!r}")
    if isinstance(v["logging_dir"], str):
        from unhype.atomic import check_output_folder

        try:
            check_output_folder(v["logging_dir"], "logging_dir")
        except UnHypeError as exc:
            problems.append(str(exc))
    if isinstance(v["sample_prompts"], str):
        from unhype.trainer.samples import read_sample_prompts

        path = Path(v["sample_prompts"])
        if not path.is_file():
            problems.append(f"sample_prompts {path}: no such file")
        else:
            try:
                if not read_sample_prompts(path):
                    problems.append(f"sample_prompts {path}: no prompts in it (one a line)")
            except UnHypeError as exc:
                problems.append(f"sample_prompts {exc}")
    return problems


def check_output_dir(cfg: TrainConfig) -> Path:
    """Create the output folder if needed; a clear error if it cannot be written."""
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UnHypeError(f"--output_dir {out}: cannot create it ({exc.strerror})") from None
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise UnHypeError(f"--output_dir {out}: not a writable folder")
    from unhype.atomic import check_output

    check_output(out / f"{cfg.output_name}.safetensors", flag="the result file",
                 inputs=[cfg.pretrained_model_name_or_path, cfg.concepts, cfg.sample_prompts,
                         cfg.retain_prompts, cfg.config_file])
    return out


def pick_device(name: str) -> str:
    import torch

    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UnHypeError(f"--device {name}: CUDA is not available here")
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


