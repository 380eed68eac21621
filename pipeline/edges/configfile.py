"""Reading a config file: YAML or TOML from disk, ``${VAR}`` interpolated from the environment, then validated.

The I/O half of the config (the pure model is ``pipeline.core.config``); ``load_config`` is what the CLI
and the Python API call, and the only place the package reads the environment for a config.

A config file may come from someone else, so its shape is bounded before anything walks it: YAML anchors
and aliases (``&a`` / ``*a``, ``<<: *a``) share one value among many places, and a few lines of them can
stand for billions of values (the "billion laughs"), or for a value that contains itself. The YAML node
graph is measured as it would expand, in time proportional to the file, and refused past ``MAX_VALUES``
values or ``MAX_DEPTH`` levels of nesting; interpolation then keeps shared values shared.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.config import Config, config_from_dict, with_proxy_environment
from pipeline.core.errors import ConfigError

#: Values (mappings, lists, keys and scalars) a config may expand to; a real job config has a few hundred.
MAX_VALUES = 100_000
#: Levels of nesting a config may have; a real one has four or five.
MAX_DEPTH = 64

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str], path: str = "", *, _done: dict[int, Any] | None = None) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a parsed document; ``$$`` is ``$``.

    A mapping or list that appears in several places (a YAML alias) is interpolated once and stays one
    shared object, so aliases never multiply into copies here."""
    done = {} if _done is None else _done
    if isinstance(value, dict | list):
        if id(value) not in done:
            if isinstance(value, dict):
                done[id(value)] = {k: interpolate(v, env, f"{path}.{k}" if path else str(k), _done=done)
                                   for k, v in value.items()}
            else:
                done[id(value)] = [interpolate(v, env, f"{path}[{i}]", _done=done) for i, v in enumerate(value)]
        return done[id(value)]
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
    """YAML by default, TOML for ``.toml`` files; refused (``ConfigError``) when it would expand past
    ``MAX_VALUES`` values or ``MAX_DEPTH`` levels, before anything is built from it."""
    if suffix == ".toml":
        document = tomllib.loads(text)
        measure(document, _data_children)
        return document
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        measure(node, _node_children)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def measure(root: Any, children: Callable[[Any], list[Any]]) -> int:
    """The number of values ``root`` stands for once every shared part is counted at each of its uses.

    Walks each distinct part once (without recursion, so depth cannot overflow the stack); raises
    ``ConfigError`` past ``MAX_VALUES`` values or ``MAX_DEPTH`` levels, or for a part inside itself.
    """
    sizes: dict[int, int] = {}
    path: list[tuple[Any, Iterator[Any]]] = [(root, iter(children(root)))]
    on_path = {id(root)}
    while path:
        part, pending = path[-1]
        for child in pending:
            if id(child) in sizes:
                continue
            if id(child) in on_path:
                raise ConfigError("a YAML alias refers to a value that contains it (an endless config); "
                                  "remove that alias")
            if len(path) >= MAX_DEPTH:
                raise ConfigError(f"nested more than {MAX_DEPTH} levels deep; a job config needs a few")
            on_path.add(id(child))
            path.append((child, iter(children(child))))
            break
        else:
            path.pop()
            on_path.discard(id(part))
            sizes[id(part)] = size = 1 + sum(sizes[id(child)] for child in children(part))
            if size > MAX_VALUES:
                raise ConfigError(f"expands to more than {MAX_VALUES:,} values (YAML aliases, *name, repeat "
                                  "what their anchor holds at every use); refused as a config bomb")
    return sizes[id(root)]


def _node_children(node: yaml.Node) -> list[Any]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _data_children(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    if isinstance(value, list):
        return list(value)
    return []


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate a config file; every problem becomes one ``ConfigError``. The
    environment's proxy variables fill ``endpoint.proxy`` / ``no_proxy`` where the file leaves them unset."""
    path = Path(path)
    env = os.environ if env is None else env
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                          "save the config as UTF-8") from None
    kind = "TOML" if path.suffix.lower() == ".toml" else "YAML"
    try:
        document = parse_document(text, path.suffix.lower())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid {kind}: nested too deeply to read; a job config needs a few "
                          "levels") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {kind}: {_one_line(exc)}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (endpoint, request, ...)")
    try:
        document = interpolate(document, env)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return with_proxy_environment(config_from_dict(document, source=str(path)), env)


def _one_line(exc: Exception) -> str:
    """A parser's complaint on one line, with its position but without the quoted source line (which may
    hold a secret)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f"{exc.context}: " if exc.context else ""
        return f"{context}{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())
