"""`unhype toy build | sample | report`: rebuild, try and measure the embedded toy model."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("toy", help="the embedded toy text-to-image model",
                                   description=__doc__)
    sub = parser.add_subparsers(dest="toy_command", metavar="TOY_COMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    p = sub.add_parser("build", help="retrain every toy weight from a seed (42 min measured on 2 cores, 1 thread)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="weights folder (default: the "
                   "committed one, unhype/toy/weights)")
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument("--stages", default="clip,judge,unet",
                   help="comma-separated subset of clip,judge,unet,flow (flow: the toy flow "
                   "model, unhype/toy/flow.py; not in the default)")
    p.add_argument("--flow-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 2, or 1 when the CPUs are already busy)")
    p.set_defaults(func=_build)

    p = sub.add_parser("sample", help="write a labelled grid of samples for a prompt")
    p.add_argument("prompt")
    p.add_argument("-n", type=int, default=16, help="number of images")
    p.add_argument("-o", "--output", type=Path, default=Path("grid.png"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--weights", type=Path, default=None)
    p.set_defaults(func=_sample)

    p = sub.add_parser("report", help="measure quality with the judges, write docs/toy.md")
    p.add_argument("--per-class", type=int, default=64)
    p.add_argument("--output", type=Path, default=Path("docs/toy.md"))
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--no-sweep", action="store_true", help="skip the guidance sweep")
    p.set_defaults(func=_report)

    p = sub.add_parser("flow-report", help="measure the toy flow model (and erasure on it with "
                       "--hypernet), write docs/toy_flow.md")
    p.add_argument("--per-class", type=int, default=32)
    p.add_argument("--hypernet", action="append", default=[],
                   help="a hypernetwork trained on toy_flux (repeatable): erasure measured")
    p.add_argument("--erase-per-class", type=int, default=24)
    p.add_argument("--output", type=Path, default=Path("docs/toy_flow.md"))
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--no-sweep", action="store_true", help="skip the guidance sweep")
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section")
    p.set_defaults(func=_flow_report)


def _build(args: argparse.Namespace) -> int:
    from unhype.toy import build, model

    out = args.out or model.weights_dir()
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    summary = build.build(out, seed=args.seed, stages=stages,
                          unet_steps=args.unet_steps or build.UNET_STEPS, threads=args.threads,
                          flow_steps=args.flow_steps)
    print(f"toy weights written to {out} in {summary['total_minutes']:.1f} min")
    if "judge_heldout_accuracy" in summary:
        s, c = summary["judge_heldout_accuracy"]
        print(f"judge on held-out rendered images: shape {s:.1%}, colour {c:.1%}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import time

    from unhype.atomic import check_output
    from unhype.errors import UnHypeError
    from unhype.toy import data, grid, judge, model

    if args.n < 1:
        raise UnHypeError(f"-n must be at least 1 image, got {args.n}")
    if args.steps is not None and args.steps < 1:
        raise UnHypeError(f"--steps must be at least 1, got {args.steps}")
    if args.output.parent.is_dir():  # else save_image_atomic creates the folder
        check_output(args.output, flag="-o")
    model.set_threads()
    toy = model.load_toy(weights=args.weights)
    kwargs = {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance)) if v}
    start = time.time()
    images = toy.sample([args.prompt] * args.n, seed=args.seed, **kwargs)
    seconds = time.time() - start
    labels = None
    try:
        shapes, colours = judge.load_judge(args.weights).classify(images)
        labels = [f"{data.COLOURS[c]} {data.SHAPES[s]}" for s, c in zip(shapes, colours)]
    except FileNotFoundError:
        pass
    title = f'"{args.prompt}" seed {args.seed}'
    grid.save_image_atomic(grid.make_grid(images, labels, title), args.output)
    print(f"{args.n} images in {seconds:.2f} s -> {args.output}"
          + (" (labels: the judge's reading)" if labels else ""))
    return 0


def _report(args: argparse.Namespace) -> int:
    import json

    from unhype.toy import clip, judge, model, report

    model.set_threads()
    weights = args.weights or model.weights_dir()
    toy = model.load_toy(weights=weights)
    net = judge.load_judge(weights)
    parts = clip.ToyClipParts(weights)
    results = report.measure(toy, net, per_class=args.per_class, clip_parts=parts)
    results.update(report.extras(toy, net, parts, weights, sweep=not args.no_sweep))
    report.write_markdown(args.output, results)
    print(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.output}")
    return 0


def _flow_report(args: argparse.Namespace) -> int:
    import json

    from unhype.toy import flow_report, model

    model.set_threads()
    results = flow_report.run(args.per_class, args.hypernet, args.erase_per_class, args.output,
                              args.weights, not args.no_sweep, args.note)
    print(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.output}")
    return 0
