"""The package version, kept in core so any layer can name it (the client's User-Agent) without importing
the package root, whose lazy exports reach up to the API. ``pyproject.toml`` reads it from here."""

__version__ = "0.1.0"
