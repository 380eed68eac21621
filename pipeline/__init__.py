"""pipeline: caption large image collections through any OpenAI-compatible streaming vision endpoint."""

__version__ = "0.1.0"
