"""`unhype train`: the trainer's command line (kohya-style flags, `--config_file x.toml`)."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a hypernetwork that erases concepts (ESD + Hypernet Fields)",
        description="Train an UnHype hypernetwork. Options come from --config_file (TOML) and "
                    "the command line; flags win. Example: unhype train --config_file "
                    "unhype/trainer/configs/toy_demo.toml")
    from unhype.trainer.config import add_arguments

    add_arguments(parser)
    parser.set_defaults(func=run)
    parser.__class__ = _strict(type(parser))


def _strict(cls):
    """`cls` that refuses unknown arguments itself: the top-level parser would report them
    with its own usage (`unhype [-h] COMMAND ...`), not `unhype train`'s."""
    class Strict(cls):
        def parse_known_args(self, args=None, namespace=None):
            parsed, extras = super().parse_known_args(args, namespace)
            if extras:
                self.error(f"unrecognized arguments: {' '.join(extras)}")
            return parsed, extras
    return Strict


def run(args) -> int:
    """`unhype train ...` and `accelerate launch -m unhype train ...`: the same code path."""
    from unhype.trainer.config import resolve
    from unhype.trainer.distributed import make_accelerator
    from unhype.trainer.loop import prepare, train

    cfg = resolve(args)
    accelerator = make_accelerator(cfg)
    session = prepare(cfg, quiet=not accelerator.is_main_process, accelerator=accelerator)
    if cfg.probe_lambda:
        if not accelerator.is_main_process:  # a probe is one process's job
            return 0
        from unhype.trainer.calibrate import probe
        from unhype.trainer.loop import build_cache, index_cache

        if cfg.latent_cache:
            session.cache = build_cache(session, progress=True)
            index_cache(session)
        probe(session, [float(x) for x in cfg.probe_lambda.split(",")])
        return 0
    code = train(session)
    if code == 0 and cfg.eval and accelerator.is_main_process:
        from unhype.trainer.evaluate import evaluate_run

        evaluate_run(session)
    accelerator.wait_for_everyone()
    return code
