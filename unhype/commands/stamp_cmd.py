"""`unhype stamp-floor HYPERNET -o OUT`: give a file trained before the gate floor its reference.

The trainer stores `gate_reference` (unhype/gate_floor.py) in every file it writes; hosts apply
the floor only where it is there. This computes it for an older file the way the trainer does,
from the concepts' own training prompts (rebuilt from the file's metadata) and the base model's
text encoder, and writes the file again with it (and each concept's own reference and signature,
unhype.concept_signatures): the weights bit for bit, atomically.
`--gate_saturate` also stores saturation (hosts raise every prompt above the floor to the
concepts' strength). On a file that already has its reference, `--gate_floor` and
`--gate_saturate` only set those, without the text encoder; `--force` recomputes the reference.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("stamp-floor", help="store the gate-floor reference in a "
                              "hypernetwork trained before it existed, so hosts apply the floor")
    p.add_argument("hypernet", help="UnHype hypernetwork .safetensors")
    p.add_argument("-o", "--output", required=True,
                   help="output .safetensors (may be the input file: it is replaced atomically)")
    p.add_argument("--text_encoder", default=None,
                   help="the base model's text encoder: its A1111 / ComfyUI checkpoint "
                        "(.safetensors), a diffusers pipeline or text-encoder folder, or (SD1, "
                        "FLUX) a CLIP-L file such as ComfyUI's clip_l.safetensors; not needed "
                        "for the toy family")
    p.add_argument("--concepts", default=None,
                   help="the concept file the hypernetwork was trained from; needed only when "
                        "it was trained on custom templates")
    p.add_argument("--gate_floor", type=float, default=None,
                   help="floor to store with it (default: the file's, else 0.03); on a file "
                   "that has its reference, only the floor is changed (no text encoder)")
    p.add_argument("--gate_saturate", action=argparse.BooleanOptionalAction, default=None,
                   help="store saturation: hosts raise every prompt above the floor to the "
                   "concepts' strength (direct-mode files only; default: the file's)")
    p.add_argument("--force", action="store_true",
                   help="recompute a reference the file already has")
    p.set_defaults(func=run)


def _lacks_signatures(loaded) -> str | None:
    """What a file of several concepts without their signatures misses, and how to add them
    (None: it has them, or has one concept)."""
    from unhype.concept_signatures import KEY

    targets = [c for c in loaded.meta.concepts if isinstance(c, dict)]
    if len(targets) < 2 or KEY in loaded.meta.training:
        return None
    return ("this file of several concepts stores no concept signatures, so hosts cannot tell "
            "its concepts apart (saturation to each concept's own strength, long prompts "
            "naming two of them): --force adds them, with the text encoder")


def run(args) -> int:
    from unhype.trainer.concepts import concepts_of_file
    from unhype.atomic import check_output
    from unhype.embedding import load_embedder
    from unhype.errors import UnHypeError
    from unhype.fileformat import load_hypernet, save_with_training
    from unhype.concept_signatures import KEY as SIGNATURES, mean_embeddings
    from unhype.gate_floor import check_floor, concept_references, saturate_refusal

    # before the text encoder loads, not after; the hypernetwork itself may be the output
    out = check_output(args.output, [args.text_encoder, args.concepts], "-o")
    floor = None if args.gate_floor is None else check_floor(args.gate_floor)
    loaded = load_hypernet(args.hypernet)
    if args.gate_saturate or (floor is not None and args.gate_saturate is None
                              and loaded.stored_saturate):
        # the floor the file will have: saturation needs one above 0, as in the trainer
        refusal = saturate_refusal(loaded.meta.training.get("mode"),
                                   loaded.gate_floor if floor is None else floor)
        if refusal:
            raise UnHypeError(f"{loaded.path}: {refusal}")
    if loaded.gate_reference is not None and not args.force:
        # the floor and saturation are settings on top of the reference: no text encoder
        settings = {k: v for k, v in (("gate_floor", floor),
                                      ("gate_saturate", args.gate_saturate)) if v is not None}
        unsigned = _lacks_signatures(loaded)
        if not settings:
            raise UnHypeError(f"{loaded.path} already stores gate_reference "
                              f"{loaded.gate_reference:.6g}; give --gate_floor or "
                              "--gate_saturate to change those, or --force to recompute it"
                              + (f" ({unsigned})" if unsigned else ""))
        save_with_training(loaded, out, tool="unhype stamp-floor", **settings)
        print(f"wrote {out}: " + ", ".join(f"{k} {str(v).lower()}" for k, v in settings.items())
              + f" (gate_reference {loaded.gate_reference:.6g} kept)")
        if unsigned:
            print(f"unhype stamp-floor: note: {unsigned}", file=sys.stderr)
        return 0
    concepts = concepts_of_file(loaded.meta.concepts, args.concepts, where=str(loaded.path))
    embedder = load_embedder(loaded.family, args.text_encoder)
    refs = concept_references(loaded.hypernet, embedder, concepts)
    reference = min(refs.values())
    if not (reference > 0 and math.isfinite(reference)):
        raise UnHypeError(f"{loaded.path}: the update is zero on its own concepts' prompts, so a "
                          "floor has nothing to be relative to (an untrained file?)")
    floor = loaded.gate_floor if floor is None else floor
    saturate = {} if args.gate_saturate is None else {"gate_saturate": args.gate_saturate}
    encoder = Path(args.text_encoder).name if args.text_encoder else "the toy CLIP"
    # with each concept's own reference and signature (unhype.concept_signatures)
    save_with_training(loaded, out, tool="unhype stamp-floor", gate_reference=reference,
                       gate_floor=floor, **saturate, concept_references=refs,
                       **{SIGNATURES: mean_embeddings(embedder, concepts)},
                       gate_reference_source=f"unhype stamp-floor, "
                       f"{sum(len(c.prompts()) for c in concepts)} concept prompts, "
                       f"text encoder {encoder}")
    print(f"wrote {out}: gate_reference {reference:.6g} (the smallest median update norm over "
          f"{len(concepts)} concept(s)), gate_floor {floor:g}")
    return 0
