"""Cost of adversarial gate training (`--adversarial_eps`, unhype/trainer/adversary.py) per removal batch.

The search runs through the hypernetwork only (no UNet pass): this prints its time for a batch
of 8 prompts next to one hypernetwork forward, for the toy and SD1.5 target layers (the SD1.5
UNet is built on the meta device: exact layer shapes, no weights), per variant. Compare with a
training step (docs/training.md: toy ~0.3 s, SD1.5-size on CPU ~90-125 s).

    python benchmarks/bench_adversary.py [--steps 3] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="PGD steps (the trainer's default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffusers import UNet2DConditionModel

    from benchmarks.bench_speed import timed
    from unhype.trainer.adversary import ball_points, worst_case_embedding
    from unhype.families import get_family
    from unhype.hypernet import HyperNetConfig, TargetSpec, build_hypernet, default_hidden

    print(f"| model | variant | hypernet params | H(e) for 8 prompts, ms | adversarial search "
          f"({args.steps} PGD steps), ms | ratio |")
    print("|---|---|---|---|---|---|")
    for kind, family_name in (("toy", "toy"), ("SD1.5", "sd1")):
        family = get_family(family_name)
        with torch.device("meta"):
            unet = UNet2DConditionModel(**family.config())
        targets = [TargetSpec(t.name, t.module_type, t.in_dim, t.out_dim, t.path)
                   for t in family.targets(model=unet)]
        for variant in ("per_layer", "shared"):
            net = build_hypernet(HyperNetConfig(variant=variant, targets=targets,
                                                embed_dim=family.embedding.dim,
                                                hidden=default_hidden(variant), seed=0))
            with torch.no_grad():  # non-zero B, as after training
                for p in net.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            emb = torch.randn(8, family.embedding.dim) * 8
            start = ball_points(8, family.embedding.dim, torch.Generator().manual_seed(0))
            with torch.no_grad():
                forward = timed(lambda: net(emb), args.repeats)
            search = timed(
                lambda: worst_case_embedding(net, emb, 0.5, args.steps, start), args.repeats)
            print(f"| {kind} | {variant} | {net.num_parameters():,} | {1e3 * forward:.1f} | "
                  f"{1e3 * search:.1f} | {search / forward:.1f} |", flush=True)


if __name__ == "__main__":
    main()
