"""Subcommands of the `unhype` CLI that belong to the core library."""
