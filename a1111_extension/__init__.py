"""UnHype's AUTOMATIC1111 / Forge extension (the web UI loads ``scripts/`` by file path).

The code lives in the ``unhype_webui`` package beside this file; the thin loaders
(``scripts/unhype_script.py`` here, ``scripts/unhype_a1111.py`` at the repository root) put this
folder on ``sys.path`` and import it, so both ways of installing give the same module names.
"""
