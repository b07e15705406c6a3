"""What erased prompts render as, per method: the toy judge's confidence on the erased-class and
synonym images, and a grid of them.

H_o only asks whether an erased prompt's image is still the concept. A method can erase by
drawing another clean shape (SPM, plain direct mode) or by turning the picture into a texture
(the adversarially trained files of the fifth session); the judge is near-certain on a clean
shape (base images: 0.998) and unsure on a texture, so its top-class probability tells the two
apart. Methods: NAME=FILE (a hypernetwork, with its gate floor), `spm` (trained here, 400 steps,
seed 0, as compare_methods.py) or `base`.

    python benchmarks/erased_quality.py --target triangle --eval-seed 777 \\
        r4=runs/.../hypernet.safetensors spm base
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("methods", nargs="+", help="NAME=hypernet.safetensors, spm or base")
    ap.add_argument("--target", default="triangle")
    ap.add_argument("--eval-seed", dest="eval_seed", type=int, default=777)
    ap.add_argument("--per-class", dest="per_class", type=int, default=50)
    ap.add_argument("--steps", type=int, default=400, help="SPM training steps")
    ap.add_argument("--grid", type=int, default=12, help="erased images per method in the grid")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/erased_quality")
    args = ap.parse_args(argv)

    import torch
    from torchvision.utils import save_image

    from unhype.trainer.backends.toy import ToyBackend
    from unhype.baselines.registry import build
    from unhype.evaluation.harness import ToyGenerator, evaluate
    from unhype.evaluation.methods import Method, UnHypeMethod
    from unhype.evaluation.prompts import load_prompt_set
    from unhype.evaluation.zero_shot import load_classifier
    from unhype.fileformat import load_hypernet
    from unhype.toy.model import set_threads

    set_threads()
    backend = ToyBackend("cpu")
    gen = ToyGenerator(backend.toy)
    ps = load_prompt_set("toy")
    clf = load_classifier("judge", ps.class_names, ps.class_prompts())
    methods = []
    for spec in args.methods:
        if spec == "base":
            methods.append(Method())
        elif spec == "spm":
            methods.append(build("spm", gen, backend, [args.target], ps, args.steps, 0))
        elif "=" in spec:
            name, path = spec.split("=", 1)
            methods.append(UnHypeMethod.from_loaded(load_hypernet(path), name=name))
        else:
            ap.error(f"{spec!r}: NAME=FILE, spm or base")
    res = evaluate(gen, methods, ps, [args.target], clf, args.per_class, args.eval_seed, 64,
                   progress=False, keep_images=10 ** 9)
    rows, grid = {}, []
    for m in methods:
        r = res["methods"][m.name]
        conf = clf.confidence(torch.cat([r["images"]["erased"], r["images"]["synonyms"]]))
        rows[m.name] = {"h_o": r["h_o"], "acc_e": r["acc_e"], "acc_g": r["acc_g"],
                        "confidence": float(conf.mean()), "confident": float((conf > 0.9).float().mean())}
        grid += list(r["images"]["erased"][:args.grid])
    args.out.mkdir(parents=True, exist_ok=True)
    save_image(torch.stack(grid), str(args.out / f"erased-{args.target}.png"), nrow=args.grid,
               padding=1)
    (args.out / f"erased-{args.target}.json").write_text(json.dumps(rows, indent=1))
    print(f"Erasing '{args.target}', eval seed {args.eval_seed}, {args.per_class} images per set: "
          f"the judge's top-class probability on the erased and synonym images (grid: "
          f"{args.out / f'erased-{args.target}.png'}, one row per method).\n")
    print("| method | H_o | Acc_e | Acc_g | judge confidence, mean | share above 0.9 |")
    print("|---|---|---|---|---|---|")
    for n, r in rows.items():
        print(f"| {n} | {100 * r['h_o']:.1f} | {100 * r['acc_e']:.0f} | {100 * r['acc_g']:.0f} | "
              f"{r['confidence']:.3f} | {100 * r['confident']:.0f}% |")


if __name__ == "__main__":
    main()
