"""Reading a config file: YAML or TOML from disk, ``${VAR}`` interpolated from the environment, then validated.

The I/O half of the config (the pure model is ``pipeline.core.config``); ``load_config`` is what the CLI
and the Python API call, and the only place the package reads the environment for a config.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.config import Config, config_from_dict
from pipeline.core.errors import ConfigError

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a parsed document; ``$$`` is ``$``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise ConfigError(
            f"{path}: environment variable {name} is not set; "
            f"export it or write ${{{name}:-default}}"
        )

    return _VAR.sub(replace, value)


def parse_document(text: str, suffix: str) -> Any:
    """YAML by default, TOML for ``.toml`` files."""
    if suffix == ".toml":
        return tomllib.loads(text)
    return yaml.safe_load(text)


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate a config file; every problem becomes one ``ConfigError``."""
    path = Path(path)
    env = os.environ if env is None else env
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        document = parse_document(text, path.suffix.lower())
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {exc}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (endpoint, request, ...)")
    try:
        document = interpolate(document, env)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config_from_dict(document, source=str(path))
