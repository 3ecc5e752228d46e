"""The version of modelseal: one place, read by the package metadata (pyproject), the public API and serve."""

__version__ = "0.1.0"
