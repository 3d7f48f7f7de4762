"""YAML read without guesses: what YAML 1.1 (PyYAML) would silently turn into something other than
what the user wrote is an error naming the file, the line and the key.

- a key given twice in one mapping (YAML keeps the last one without a word);
- ``yes``/``no``/``on``/``off`` (any case; PyYAML reads them as booleans): only ``true`` and ``false``
  are booleans here; quote the word for a string (``country: "no"``);
- an integer with a leading zero (``010`` is octal 8 in YAML 1.1) or in base 60 (``1:30`` is 90), and
  a base-60 float;
- a key that is not a string (``on:`` becomes the boolean ``True``; ``1:`` the integer 1).
"""
from __future__ import annotations

import re
from typing import Any

import yaml

from rwkvclip_dist.typed_config import ConfigError

_BOOL, _INT, _FLOAT, _STR = (f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "str"))
_OCTAL = re.compile(r"[-+]?0[0-7_]+")


def _scalar_problem(node: yaml.ScalarNode) -> str | None:
    value = node.value
    if node.tag == _BOOL and value.lower() not in ("true", "false"):
        return (f"{value!r} is read by YAML as the boolean {value.lower() in ('yes', 'on')}; write true or "
                f"false, or quote it for a string")
    if node.tag == _INT and _OCTAL.fullmatch(value):
        return f"{value!r} is read by YAML as the octal number {int(value.replace('_', ''), 8)}; drop the leading zero, or quote it"
    if node.tag in (_INT, _FLOAT) and ":" in value:
        return f"{value!r} is read by YAML as a base-60 number; quote it for a string"
    return None


def _check(node: yaml.Node, key: str, source: str) -> None:
    def fail(at: yaml.Node, where: str, message: str) -> ConfigError:
        return ConfigError(f"{source}: line {at.start_mark.line + 1}: {where + ': ' if where else ''}{message}")

    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR:
                name = getattr(key_node, "value", "?")
                raise fail(key_node, key, f"key {name!r} is not read as a string by YAML; quote it")
            name = key_node.value
            dotted = f"{key}.{name}" if key else name
            if name in seen:
                raise fail(key_node, dotted, f"given twice (first on line {seen[name]}); YAML would keep only this "
                                             f"one without a word")
            seen[name] = key_node.start_mark.line + 1
            _check(value_node, dotted, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check(item, f"{key}[{i}]", source)
    elif isinstance(node, yaml.ScalarNode):
        problem = _scalar_problem(node)
        if problem:
            raise fail(node, key, problem)


def load_strict(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` after the checks above; ``source`` (e.g. ``recipe /abs/r.yaml``) starts
    every error message."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check(node, "", source)
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {err}") from None
