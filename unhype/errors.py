"""The single exception type UnHype raises for bad input (files, models, configs, values)."""


class UnHypeError(ValueError):
    """Bad input: the message names the problem and, where there is one, the file."""
