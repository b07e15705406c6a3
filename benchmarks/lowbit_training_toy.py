"""What does training on a 4-bit base (`--nf4_base`) cost the erasure? Measured on the toy world.

`--nf4_base` trains the hypernetwork against a denoiser whose linear layers are bitsandbytes NF4
(QLoRA's storage), while the file is later used on whatever the host loads: often the full
model. On the toy: train one config twice from the same seed, once on the committed toy UNet
and once with its linear layers replaced by real bitsandbytes `Linear4bit` NF4 layers (the
trainer's own `store_in_nf4`, computing in fp32; the toy backend never applies the flag itself),
then evaluate both files (MACE protocol, toy judge) on the full-precision toy and on its
NF4-rounded copy with `fp8_inference_toy.py`. The toy is tiny; FLUX's own sensitivity is not
measured here.

    python benchmarks/lowbit_training_toy.py unhype/trainer/configs/toy_robust.toml \
        --out runs/lowbit_train [--steps 400] [--per_class 50] [--concepts square] [--train_only]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def train_file(config: str, out_dir: Path, steps: int | None, nf4: bool,
               concepts: str | None = None) -> Path:
    """Train `config` into out_dir (on the NF4 toy when nf4); the saved file's path."""
    from unhype.trainer.backends.toy import ToyBackend
    from unhype.trainer.config import add_arguments, resolve
    from unhype.trainer.loop import prepare, train
    from unhype.trainer.memory import store_in_nf4

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--config_file", config, "--output_dir", str(out_dir)]
    if steps:
        argv += ["--max_train_steps", str(steps)]
    if concepts:
        argv += ["--concepts", concepts]
    cfg = resolve(parser.parse_args(argv))
    backend = ToyBackend("cpu")
    if nf4:
        layers = store_in_nf4(backend.unet, torch.float32, "cpu")
        print(f"toy UNet: {layers} linear layers in bitsandbytes NF4", file=sys.stderr)
    run = prepare(cfg, quiet=True, backend=backend)
    if train(run) != 0:
        raise SystemExit(f"training {config} ({'nf4' if nf4 else 'full'}) failed")
    return out_dir / f"{cfg.output_name}.safetensors"


def main(argv=None):
    import fp8_inference_toy

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a toy training config, e.g. unhype/trainer/configs/toy_robust.toml")
    ap.add_argument("--out", default="runs/lowbit_train")
    ap.add_argument("--steps", type=int, default=None, help="override max_train_steps")
    ap.add_argument("--per_class", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--concepts", default=None, help="override the config's concepts")
    ap.add_argument("--train_only", action="store_true", help="skip the evaluation (e.g. to "
                    "run `unhype eval` on both files with the harder generality set)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    for kind in ("full", "nf4"):
        path = out / kind
        file = next(path.glob("*.safetensors"), None) if path.is_dir() else None
        if file is None:  # trained once; rerun the evaluation freely
            file = train_file(args.config, path, args.steps, nf4=kind == "nf4",
                              concepts=args.concepts)
        if args.train_only:
            continue
        print(f"\n## trained on the {'NF4' if kind == 'nf4' else 'full-precision'} toy UNet "
              f"({file})", flush=True)
        fp8_inference_toy.main([str(file), "--formats", "nf4", "--per_class",
                                str(args.per_class), "--seed", str(args.seed)])


if __name__ == "__main__":
    main()
