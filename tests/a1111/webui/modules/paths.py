"""modules/paths.py models_path (set by the tests to a temporary folder)."""

models_path = "models"
script_path = "."
