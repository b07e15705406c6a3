"""`unhype eval`: measure erasure (MACE protocol: Acc_e, Acc_s, Acc_g, H_o; H_c; CLIP score) of
hypernetwork files and baselines on the toy model or a Stable Diffusion model.

    unhype eval --hypernet runs/toy_demo/erase_circle.safetensors          # toy: toy CLIP judge
    unhype eval --hypernet erase_ship.safetensors --model /models/sd15 \\
        --prompt_set cifar10 --classifier ViT-B-32 --clip_weights open_clip_b32.safetensors
    unhype eval --model toy --erase circle --baselines uce,negative_prompt,esd_x
    unhype eval --model toy --erase circle --nudenet --fid_reference refs/ --fid_extractor toy_clip

Writes results.json, results.md and one image grid per method to --out. Each row is saved to
--out/rows/ as it finishes (unhype.evaluation.rows): Ctrl-C writes the report of the finished rows
and exits 130, and the same command again computes only the missing rows (a row whose settings
changed is recomputed; --force recomputes all). ESD-x/u and SPM are saved to --out/trained/ as
soon as their training ends (unhype.evaluation.trained): a rerun, or a run that changes only how
they are evaluated, loads them instead of training again (an interrupted training starts over).

`accelerate launch -m unhype eval ...` (or torchrun) shares the image generation between the
processes (whole seeded batches each, so the images and the numbers are those of one process);
the main process trains (or loads) each trained baseline and sends its weights to the others,
and writes the outputs.
"""

from __future__ import annotations

import argparse
import sys

from unhype.toy import DEFAULT_STEPS as TOY_STEPS

SD_STEPS = 30  # sampling steps on Stable Diffusion models unless --steps


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="measure erasure: Acc_e/Acc_s/Acc_g, H_o, H_c, CLIP "
                              "score of hypernetworks and baselines",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hypernet", action="append", default=[], metavar="FILE",
                   help="UnHype hypernetwork file (repeat to compare several)")
    p.add_argument("--model", default=None, help="'toy' (default for toy files) or a diffusers "
                   "folder / single-file checkpoint")
    p.add_argument("--model_config", default=None, help="config of a single-file checkpoint: a "
                   "diffusers folder, or built-in sd15 / sd2-v / sd2-base / sdxl-base / sdxl-v "
                   "(default: the one for the checkpoint's family and what it predicts, read "
                   "from the file as ComfyUI and Forge read it)")
    p.add_argument("--v_parameterization", action="store_true", help="the model predicts v, "
                   "whatever its scheduler config says (as unhype train)")
    p.add_argument("--zero_terminal_snr", action="store_true", help="the model's schedule is "
                   "rescaled to zero terminal SNR (as unhype train; a file's ztsnr key sets it)")
    p.add_argument("--toy_weights", default=None, help="toy weights folder (default: committed)")
    p.add_argument("--erase", default=None, help="comma-separated erased classes (default: the "
                   "hypernetworks' concept targets)")
    p.add_argument("--prompt_set", default=None, help="built-in name (toy, cifar10, "
                   "celebrities_example) or a TOML file (default: toy / cifar10)")
    p.add_argument("--per_class", type=int, default=10, help="images per class and set")
    p.add_argument("--generality", default="synonyms", help="the kinds of prompt Acc_g is "
                   "measured on, comma-separated: synonyms (MACE), paraphrases (the class name "
                   "in the prompt set's paraphrase_templates), misspellings (of the class name), "
                   "composites (the class named beside a class not erased: 'a red circle and a "
                   "blue heart')")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps (default: toy "
                   f"{TOY_STEPS}, SD {SD_STEPS})")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (model default)")
    p.add_argument("--strength", type=float, default=1.0, help="hypernetwork LoRA strength")
    p.add_argument("--gate_floor", type=float, default=None, help="prompts whose update is "
                   "below this fraction of the concept's get none (unhype.gate_floor; default: "
                   "the file's gate_floor, for files that store a gate reference; 0 = off)")
    p.add_argument("--gate_saturate", action=argparse.BooleanOptionalAction, default=None,
                   help="raise every prompt above the floor to the concept's strength "
                   "(unhype.gate_floor; default: what the file says)")
    p.add_argument("--classifier", default=None, help="'judge' (the toy's CNN, trained on "
                   "rendered ground truth; default on the toy), 'toy' (toy CLIP, zero-shot) or "
                   "an open_clip model name / config .json (default ViT-B-32)")
    p.add_argument("--clip_weights", default=None, help="open_clip weights: a local .safetensors "
                   "or a pretrained tag such as 'openai' (needs network); required on SD models")
    p.add_argument("--allow_random_classifier", action="store_true", help="tests only: classify "
                   "SD images with a randomly initialised open_clip (every accuracy is noise)")
    p.add_argument("--baselines", default="", help="comma-separated: negative_prompt, uce, "
                   "esd_x, esd_u, spm")
    p.add_argument("--baseline_steps", type=int, default=300, help="training steps of esd_x/u, spm")
    p.add_argument("--baseline_seed", type=int, default=None, help="training seed of esd_x/u, "
                   "spm (default: --seed); fix it to compare eval seeds without training again")
    p.add_argument("--no_base", action="store_true", help="skip the base model row")
    p.add_argument("--nudenet", action="store_true", help="count NudeNet exposed-part "
                   "detections at 0.6 (needs the nudenet package)")
    p.add_argument("--fid_reference", default=None, help="folder of reference images (>= 2 "
                   ".png/.jpg/...): FID of the other-class images against them")
    p.add_argument("--fid_extractor", default=None, choices=["inception", "toy_clip", "open_clip"],
                   help="FID features: 'inception' (clean-fid; downloads its weights once), "
                   "'toy_clip' (toy CLIP image tower, offline) or 'open_clip' (the --classifier "
                   "open_clip model with --clip_weights, offline). Default: inception when "
                   "clean-fid is installed, else toy_clip on the toy / open_clip")
    p.add_argument("--keep_images", type=int, default=8, help="images per set in the grids")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                   help="dtype of the diffusers model (as unhype train's; the toy stays fp32)")
    p.add_argument("--fp8_base", action="store_true", help="store the denoiser's linear weights "
                   "in fp8, computed in the --mixed_precision dtype (as unhype train's: "
                   "unhype/trainer/memory.py); every method is then measured on that rounded model")
    p.add_argument("--nf4_base", action="store_true", help="store them in 4-bit NF4 instead "
                   "(bitsandbytes; as unhype train's): every method is measured on that model")
    p.add_argument("--cache_text_encoder_outputs", action="store_true", help="keep the text "
                   "encoders in CPU memory between encodings (as unhype train's): each batch "
                   "brings them to the device for its own encoding (FLUX's T5-XXL: 8.9 GiB)")
    p.add_argument("--out", default="eval_out", help="output folder; each finished row is "
                   "kept in its rows/ folder, so a rerun with the same --out and settings "
                   "computes only the rows still missing, and each trained baseline in its "
                   "trained/ folder, so it is not trained again")
    p.add_argument("--force", action="store_true", help="recompute every row and train every "
                   "baseline again, even those a previous run with the same settings finished "
                   "in --out")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from unhype.trainer.config import check_device
    from unhype.atomic import check_output_folder
    from unhype.baselines.registry import BASELINES
    from unhype.errors import UnHypeError
    from unhype.evaluation import extras as extras_mod
    from unhype.evaluation.harness import EvalInterrupted, evaluate
    from unhype.evaluation.rows import BASE_SLOT, RowStore
    from unhype.evaluation.trained import TrainedStore
    from unhype.evaluation.prompts import load_prompt_set, parse_generality
    from unhype.evaluation.report import columns_for, table, write_report
    from unhype.evaluation.zero_shot import load_classifier
    from unhype.fileformat import load_hypernet, read_meta

    if args.per_class < 1 or args.batch_size < 1:
        raise UnHypeError("--per_class and --batch_size must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise UnHypeError(f"--steps {args.steps}: the sampling steps must be >= 1")
    repeated = sorted({p for p in args.hypernet if args.hypernet.count(p) > 1})
    if repeated:
        raise UnHypeError(f"--hypernet {repeated[0]} is given twice (one row per file)")
    check_output_folder(args.out)  # not after every image is made
    bad_device = check_device(args.device)
    if bad_device:
        raise UnHypeError(f"--{bad_device}")
    generality = parse_generality(args.generality)
    if args.gate_floor is not None:
        from unhype.gate_floor import check_floor

        check_floor(args.gate_floor)
    metas = [read_meta(p) for p in args.hypernet]  # cheap checks before any model loads
    families = {m.family for m in metas}
    if len(families) > 1:
        raise UnHypeError(f"the hypernetworks are for different families: {sorted(families)}")
    model = args.model or ("toy" if not metas or families == {"toy"} else None)
    if model is None:
        raise UnHypeError(f"--model is needed for {families.pop()} hypernetworks (a diffusers "
                          "folder or a single-file checkpoint)")
    toy = model == "toy"
    if metas and toy != (families == {"toy"}):
        raise UnHypeError(f"the hypernetworks are for {sorted(families)} but --model is {model}")
    erase = [w.strip() for w in args.erase.split(",")] if args.erase else \
        list(dict.fromkeys(c["target"] for m in metas for c in m.concepts))
    if not erase:
        raise UnHypeError("nothing to erase: give --erase or a --hypernet with concepts")
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown or len(set(baselines)) != len(baselines):
        what = f"unknown {unknown[0]!r}" if unknown else "a name is repeated"
        raise UnHypeError(f"--baselines: {what}; choose from {', '.join(BASELINES)}, each once")
    if not toy and not args.clip_weights and not args.allow_random_classifier and \
            (args.classifier or "ViT-B-32") not in ("judge", "toy"):
        raise UnHypeError("--clip_weights is needed to classify images of an SD model (an "
                          "open_clip .safetensors of --classifier, or a pretrained tag such as "
                          "'openai' where the network is reachable); without it the classifier "
                          "has random weights and every accuracy is noise "
                          "(--allow_random_classifier: for tests)")
    for flag, what in (("fp8_base", "fp8"), ("nf4_base", "4-bit NF4")):
        if getattr(args, flag) and "uce" in baselines:
            raise UnHypeError(f"--baselines uce edits the to_k/to_v weights, which --{flag} "
                              f"stores in {what} (the edit would be rounded away): drop one of "
                              "the two")
    ps = load_prompt_set(args.prompt_set or ("toy" if toy else "cifar10"))
    erased = [ps.class_names[i] for i in sorted({ps.index(w) for w in erase})]
    if args.fid_reference:
        extras_mod.reference_images(args.fid_reference)  # a bad folder fails before any work
        args.fid_extractor = args.fid_extractor or default_fid_extractor(toy)
        if args.fid_extractor == "open_clip":
            fid_clip_model(args, toy)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    dist = process_group(args)

    backend, generator, memory_note = load_model(model, args)
    # a damaged file, or one for another model of the family: refused before any image is made
    from unhype.fileformat import check_targets_in_model

    for path in args.hypernet:
        check_targets_in_model(load_hypernet(path, "cpu"), backend.unet)
    classifier = load_classifier(args.classifier or ("judge" if toy else "ViT-B-32"),
                                 ps.class_names, ps.class_prompts(), args.clip_weights,
                                 args.device, args.toy_weights)
    notes = [f"classifier: {classifier.description}"]
    if memory_note:
        notes.append(memory_note)
    scorer = classifier if hasattr(classifier, "clip_score") else None
    if scorer is None and toy:
        try:  # CLIP score from the toy CLIP even when the judge classifies
            scorer = load_classifier("toy", ps.class_names, ps.class_prompts(),
                                     device=args.device, toy_weights=args.toy_weights)
        except UnHypeError as exc:
            notes.append(f"CLIP score not measured: {exc}")
    store = RowStore(args.out, write=dist.is_main)
    trained = TrainedStore(args.out, write=dist.is_main)
    slots = plan_rows(args, metas, baselines, erased, ps, generality, classifier, model,
                      backend, generator, dist, trained)
    if not slots:
        raise UnHypeError("no method to evaluate (give --hypernet or --baselines, or drop --no_base)")
    reference = reuse_rows(args, slots, store, dist, notes)
    extras = []
    fid = extras_mod.fid_extra(args.fid_reference, args.fid_extractor,
                               fid_features(args, toy, classifier), args.device) \
        if args.fid_reference else (None, None)
    for fn, note in (extras_mod.nudenet_extra() if args.nudenet else (None, None), fid):
        if note:
            notes.append(note)
        if fn is not None:
            extras.append(fn)
    def save_row(slot, name, row, others):
        store.save(slot, name, row)
        if slot.id == BASE_SLOT:  # every later row's change_s / kept_s is against these
            store.save_reference(slot.key, others)

    try:
        result = evaluate(generator, slots, ps, erased, classifier, args.per_class, args.seed,
                          args.batch_size, clip_scorer=scorer, keep_images=args.keep_images,
                          extras=extras, dist=dist, generality=generality, reference=reference,
                          on_row=save_row)
    except EvalInterrupted as stop:
        if not dist.is_main:
            return EXIT_INTERRUPTED
        result = {**stop.result, "missing": stop.missing}
        notes += trained_notes(trained, args.out)
        kept = [n for n in trained.saved + trained.loaded if baseline_label(n) in stop.missing]
        notes.append(f"interrupted: no row for {', '.join(stop.missing)}; the same command "
                     "computes only those (the finished rows are reused)"
                     + (f"; the trained weights of {', '.join(kept)} are kept in "
                        f"{trained.dir}, so it does not train them again" if kept else ""))
        paths = write_report(result, args.out, settings_of(args), notes)
        if result["methods"]:
            print(table(result["methods"], columns_for(generality),
                        reference=None if args.no_base else "base model"))
        print(f"\nunhype eval: interrupted; wrote {paths['json']} and {paths['md']} with the "
              f"{len(result['methods'])} finished row(s); missing: {', '.join(stop.missing)}. "
              f"Rerun the same command (--out {args.out}) to compute only those"
              + (f" (trained weights kept, not trained again: {', '.join(kept)})"
                 if kept else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    if not dist.is_main:
        return 0
    notes += trained_notes(trained, args.out)
    paths = write_report(result, args.out, settings_of(args), notes)
    print(table(result["methods"], columns_for(generality),
                reference=None if args.no_base else "base model"))
    reused = sum(1 for s in slots if s.row is not None)
    print(f"unhype eval: wrote {paths['json']}, {paths['md']} and "
          f"{sum(1 for k in paths if k.startswith('grid'))} grids"
          + (f" ({reused} reused row(s) not redrawn: their grids are the earlier run's)"
             if reused else ""), file=sys.stderr)
    return 0


EXIT_INTERRUPTED = 130


def settings_of(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def plan_rows(args, metas, baselines, erased, ps, generality, classifier, model, backend,
              generator, dist, trained) -> list:
    """One `rows.Slot` per row, in report order: base model, hypernetworks, baselines. Each is
    built only when its row is due, and not at all when reused. A trained baseline is loaded
    from `trained` (an `evaluation.trained.TrainedStore`) when stored with its training key, else
    trained then and stored at once, by the main process only (the others receive its weights);
    its row's key holds that training key."""
    import hashlib
    from pathlib import Path

    from unhype.baselines.registry import TRAINED
    from unhype.evaluation.methods import Method, UnHypeMethod
    from unhype.evaluation.report import slug
    from unhype.evaluation.rows import BASE_SLOT, Slot, baselines_code_sha, run_key
    from unhype.evaluation.trained import from_main_process, load_or_train, training_key
    from unhype.fileformat import load_hypernet
    from unhype.infotext import file_sha256

    key = run_key(args, model, ps, erased, generality, classifier)
    slots = [] if args.no_base else [Slot(BASE_SLOT, {**key, "method": "base"}, "base model",
                                          Method)]
    for path, meta in zip(args.hypernet, metas):
        name = f"UnHype {meta.config.variant} ({path})"

        def make(path=path, name=name):
            return UnHypeMethod.from_loaded(load_hypernet(path, args.device), args.strength,
                                            name, args.gate_floor, args.gate_saturate)

        where = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:8]
        slots.append(Slot(f"unhype_{slug(Path(path).stem)}_{where}",
                          {**key, "method": "unhype", "name": name,
                           "file_sha256": file_sha256(path), "strength": args.strength,
                           "gate_floor": args.gate_floor, "gate_saturate": args.gate_saturate},
                          name, make))
    seed = args.seed if args.baseline_seed is None else args.baseline_seed
    say = (lambda message: say_above_bars(f"unhype eval: {message}")) if dist.is_main else None
    for b in baselines:
        training = training_key(args, model, b, erased, seed) if b in TRAINED else None

        def make(b=b, training=training):
            from unhype.baselines.registry import build

            def train():
                return build(b, generator, backend, erased, ps, args.baseline_steps, seed,
                             progress=dist.is_main)

            if training is None:  # UCE (closed form), negative prompt: nothing to keep
                return train()
            return from_main_process(dist, b, backend.unet, lambda: load_or_train(
                trained, b, training, train, backend.unet, args.force, say))

        slots.append(Slot(f"baseline_{b}", {**key, "method": b, "recipe": baselines_code_sha(),
                                            "training": training},
                          baseline_label(b), make))
    return slots


def say_above_bars(message: str) -> None:
    """A line on stderr that leaves the progress bars whole."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def baseline_label(name: str) -> str:
    """A baseline's row until it is built (then its method's name)."""
    return f"{name} (baseline)"


def trained_notes(trained, out) -> list[str]:
    """The report's word on the baselines loaded instead of trained (unhype.evaluation.trained)."""
    if not trained.loaded:
        return []
    return [f"not trained again: {', '.join(trained.loaded)} (weights trained by an earlier run "
            f"into {out} with the same training settings, loaded from {trained.dir})"]


def reuse_rows(args, slots, store, dist, notes):
    """Mark the rows a previous run into --out finished with the same settings (`slot.row`);
    returns the base model's stored other-class images when rows still to compute need them
    (else None). The main process decides; the others learn which rows to skip."""
    import torch

    from unhype.evaluation.rows import BASE_SLOT

    reference = None
    if dist.is_main and not args.force:
        for slot in slots:
            slot.row, why = store.load(slot)
            if why:
                print(f"unhype eval: recomputing {slot.label}: {why}", file=sys.stderr)
        base = next((s for s in slots if s.id == BASE_SLOT), None)
        if base is not None and base.row is not None and any(s.row is None for s in slots):
            reference = store.load_reference(base.key)
            if reference is None:
                base.row = None
                print("unhype eval: recomputing the base model row: its stored images, which "
                      "the rows still to compute are compared with, are missing",
                      file=sys.stderr)
    if dist.world > 1:  # every process must skip the same rows and compare with the same images
        flags = torch.tensor([s.row is not None for s in slots] + [reference is not None],
                             dtype=torch.uint8)
        flags = dist.broadcast({"f": flags} if dist.is_main else None, ["f"])["f"].tolist()
        for slot, reused in zip(slots, flags):
            if reused and slot.row is None:
                slot.row = {"name": slot.label}  # only the main process reports
        if flags[-1]:
            reference = dist.broadcast({"r": reference} if dist.is_main else None, ["r"])["r"]
    reused = [s for s in slots if s.row is not None]
    if reused and dist.is_main:
        names = ", ".join(s.row.get("name", s.label) for s in reused)
        print(f"unhype eval: reused {len(reused)} finished row(s) from a previous run in "
              f"{args.out} ({names}); --force to recompute", file=sys.stderr)
        notes.append(f"reused from an earlier run into this folder, same settings: {names} "
                     "(their grids are not redrawn)")
    return reference


def default_fid_extractor(toy: bool) -> str:
    """clean-fid's Inception when installed; otherwise an offline CLIP tower."""
    import importlib.util

    if importlib.util.find_spec("cleanfid") is not None:
        return "inception"
    return "toy_clip" if toy else "open_clip"


def fid_features(args, toy: bool, classifier):
    """The FID feature extractor of --fid_extractor (None for clean-fid's Inception)."""
    from unhype.evaluation import extras as extras_mod

    if args.fid_extractor == "toy_clip":
        return extras_mod.toy_clip_features(args.toy_weights, args.device)
    if args.fid_extractor == "open_clip":
        # the zero-shot classifier is this very open_clip model: share its image tower
        return extras_mod.open_clip_features(fid_clip_model(args, toy), args.clip_weights,
                                             args.device, getattr(classifier, "image_encoder", None))
    return None


def fid_clip_model(args, toy: bool) -> str:
    """The open_clip model of `--fid_extractor open_clip`: the zero-shot --classifier's."""
    from unhype.errors import UnHypeError

    spec = args.classifier or (None if toy else "ViT-B-32")
    if spec in (None, "judge", "toy"):
        raise UnHypeError("--fid_extractor open_clip needs an open_clip --classifier (a model "
                          "name or config .json) and its --clip_weights")
    return spec


def process_group(args):
    """The processes of `accelerate launch` / torchrun (a single process: no group at all)."""
    import os

    from unhype.distributed import Dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    from accelerate import PartialState

    state = PartialState(cpu=args.device == "cpu")
    if args.device.startswith("cuda"):
        args.device = str(state.device)  # cuda:<local rank>
    return Dist(state)


def load_model(model: str, args):
    """(trainer backend, harness generator, memory options' note) for 'toy' or a diffusers
    model."""
    from unhype.trainer import memory
    from unhype.trainer.backends import load_backend
    from unhype.trainer.config import resolve
    from unhype.evaluation.harness import BackendGenerator, ToyGenerator

    toy = model == "toy"
    cfg = resolve({"pretrained_model_name_or_path": (args.toy_weights or "toy") if toy else model,
                   "model_family": "toy" if toy else "auto", "model_config": args.model_config,
                   "device": args.device, "mixed_precision": args.mixed_precision,
                   "fp8_base": args.fp8_base, "nf4_base": args.nf4_base,
                   "cache_text_encoder_outputs": args.cache_text_encoder_outputs,
                   "v_parameterization": args.v_parameterization,
                   "zero_terminal_snr": args.zero_terminal_snr})
    backend = load_backend(cfg)  # the toy says that it ignores the precision options
    note = memory.apply(cfg, backend)
    if toy:
        return backend, ToyGenerator(backend.toy, args.steps, args.guidance), note
    return backend, BackendGenerator(backend, args.steps or SD_STEPS, args.guidance), note
