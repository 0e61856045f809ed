"""Reading run configs within bounds.

A real run config is a few kB, but YAML aliases can make a small file expand to gigabytes once it is copied,
printed or written to ``run.json``. The size is measured with every alias counted, without expanding anything,
before any Python object is built; error messages are one bounded line whatever the values hold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..config import short_repr
from ..errors import ConfigError

MAX_CONFIG_CHARS = 1_000_000


def key_text(key: Any) -> str:
    """A config key for a message: keys are short, but a hostile file can make one any size."""
    return key[:60] + ("..." if len(key) > 60 else "") if isinstance(key, str) else short_repr(key)


def check_size(obj: Any, where: str) -> None:
    if expanded_size(obj) > MAX_CONFIG_CHARS:
        raise ConfigError(f"{where} expands to more than {MAX_CONFIG_CHARS:,} characters (YAML aliases or a "
                          "self-referencing value?); write the values out, a run config needs only a few kB.")


def expanded_size(obj: Any, limit: int = MAX_CONFIG_CHARS) -> int:
    """Characters (plus one per container) of ``obj`` with every shared reference counted each time it occurs.

    Shared sub-trees are measured once and then multiplied, so an alias bomb costs no more to measure than to
    parse. Stops early (returning ``limit + 1``) past ``limit`` or on a structure that contains itself.
    """
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(x: Any) -> int:
        if isinstance(x, str):
            return len(x)
        if isinstance(x, yaml.ScalarNode):
            return len(x.value)
        if not isinstance(x, (dict, list, tuple, yaml.CollectionNode)):
            return 8
        key = id(x)
        if key in memo:
            return memo[key]
        if key in active:
            return limit + 1
        active.add(key)
        total = 1
        if isinstance(x, dict):
            items: Any = [v for kv in x.items() for v in kv]
        elif isinstance(x, yaml.MappingNode):
            items = [n for kv in x.value for n in kv]
        else:
            items = x.value if isinstance(x, yaml.SequenceNode) else x
        for item in items:
            total += size(item)
            if total > limit:
                break
        active.discard(key)
        memo[key] = total
        return total

    try:
        return min(size(obj), limit + 1)
    except RecursionError:
        return limit + 1


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that measures the document with its aliases expanded before building any Python object."""

    def construct_document(self, node: yaml.Node) -> Any:
        if expanded_size(node) > MAX_CONFIG_CHARS:
            raise ConfigError(f"the YAML document expands to more than {MAX_CONFIG_CHARS:,} characters "
                              "(aliases of aliases?); write the values out, a run config needs only a few kB.")
        return super().construct_document(node)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses documents expanding past :data:`MAX_CONFIG_CHARS`."""
    return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader subclass: no arbitrary objects


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; pass the path of a YAML or JSON run config "
                          "(examples in scripts/configs/).")
    if path.stat().st_size > MAX_CONFIG_CHARS:
        raise ConfigError(f"config file {path} is {path.stat().st_size:,} bytes; a run config needs only a few kB "
                          "(is it the right file?).")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            raw = load_yaml(text)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    except Exception as err:  # noqa: BLE001 - yaml and json raise different types; both mean a broken file
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                          f"{str(err).splitlines()[0]}") from err
    return raw if raw is not None else {}
