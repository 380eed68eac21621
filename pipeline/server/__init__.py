"""The embedded local endpoint: an honest OpenAI-compatible stand-in with fault injection.

Use :class:`LocalEndpoint` in-process (tests, ``pipeline`` runs without a model) or :func:`run_server`
from the CLI. Its answers are measured image facts phrased as captions, never model output.
"""

from pipeline.server.app import LocalEndpoint, create_app, run_server
from pipeline.server.describe import (
    ImageFacts,
    UnreadableImage,
    caption,
    describe_image,
)
from pipeline.server.faults import FaultPlan, FaultRule, parse_fault_spec
from pipeline.server.stats import EndpointStats

__all__ = [
    "EndpointStats",
    "FaultPlan",
    "FaultRule",
    "ImageFacts",
    "LocalEndpoint",
    "UnreadableImage",
    "caption",
    "create_app",
    "describe_image",
    "parse_fault_spec",
    "run_server",
]
