"""modules/devices.py autocast(disable=False): a context manager (no-op on CPU fp32)."""

import contextlib


def autocast(disable=False):
    return contextlib.nullcontext()
