"""`unhype` for `tests.launch.launch(..., module="tests.evaluation.traced_eval")`: every process
records in `$TRACE.<rank>` (JSON lines) each static-LoRA training it runs, the weights of each
baseline it makes images with, and its exit. With `$FAIL_TRAINING` the main process's training
fails, and the main process waits for the others' exits before its own (else the launcher could
end them before they print)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))


def trace(rank: int) -> Path:
    return Path(f"{os.environ['TRACE']}.{rank}")


def record(**entry) -> None:
    with open(trace(RANK), "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def exited(rank: int) -> bool:
    path = trace(rank)
    return path.is_file() and '"exit"' in path.read_text()


def traced() -> None:
    import unhype.baselines.esd as esd
    import unhype.evaluation.harness as harness
    from unhype.baselines.saved import to_tensors
    from unhype.evaluation.trained import weights_sha

    real_train, real_generate = esd.train_static_lora, harness.generate

    def train(*a, **k):
        record(event="train")
        if os.environ.get("FAIL_TRAINING") and RANK == 0:
            raise RuntimeError("training failed on purpose")
        return real_train(*a, **k)

    def generate(generator, method, *a, **k):
        if hasattr(method, "bank"):
            record(event="weights", name=method.name, sha=weights_sha(*to_tensors(method)))
        return real_generate(generator, method, *a, **k)

    esd.train_static_lora, harness.generate = train, generate


def main() -> None:
    from unhype.cli import main as unhype

    traced()
    try:
        code = unhype(sys.argv[1:])
    except Exception as exc:
        record(event="exit", error=f"{type(exc).__name__}: {exc}")
        give_up = time.monotonic() + 60  # old code: the others never exit on their own
        while RANK == 0 and not all(exited(r) for r in range(1, WORLD)) and \
                time.monotonic() < give_up:
            time.sleep(0.2)
        raise
    record(event="exit", code=code)
    sys.exit(code)


if __name__ == "__main__":
    main()
