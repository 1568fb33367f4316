"""Loading the pipeline configuration: YAML/JSON in, validated dict with every default filled out.

The schema (``msa/schemas/config.schema.yaml``, also what the Snakefile validates against) is the
single source of defaults, so a stage run by hand and the same stage run by Snakemake see the
same settings.
"""

from __future__ import annotations

import copy
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from msa.errors import InputError

SCHEMA_RESOURCE = "schemas/config.schema.yaml"
# names checked by a pattern become folders under results/
NAME_HINT = "; rename it with letters, digits, '_', '.' and '-' only (it becomes a folder name)"


class ConfigError(InputError, ValueError):
    """The configuration file is unreadable or does not follow the schema."""


def schema() -> dict:
    return yaml.safe_load(resources.files("msa").joinpath(SCHEMA_RESOURCE).read_text())


def _fill_defaults(instance: Any, sub_schema: dict) -> Any:
    """Recursively add schema defaults for absent keys (objects only)."""
    if not isinstance(instance, dict) or sub_schema.get("type") != "object":
        return instance
    for key, prop in (sub_schema.get("properties") or {}).items():
        if key not in instance and "default" in prop:
            instance[key] = copy.deepcopy(prop["default"])
        if key in instance:
            instance[key] = _fill_defaults(instance[key], prop)
    return instance


def validate(config: dict, source: str = "config") -> dict:
    """Validate against the schema and return a copy with defaults filled in."""
    config = _fill_defaults(copy.deepcopy(config or {}), schema())
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.path))
    if errors:
        lines = [f"  {'.'.join(map(str, e.path)) or '(top level)'}: {e.message}"
                 + (NAME_HINT if e.validator == "pattern" else "") for e in errors[:10]]
        raise ConfigError(f"{source} does not follow the MSA config schema:\n" + "\n".join(lines)
                          + "\nSee config/README.md for every key and its meaning.")
    return config


def load_config(path: str | Path) -> dict:
    """Read a YAML or JSON config file and validate it (defaults filled)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    return validate(raw or {}, source=str(path))


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """A copy of ``config`` with each ``section.key=YAML`` override set (the benchmarks' ``--set``):
    ``finetune.epochs=60`` sets an int, ``model.encoder_widths=[128, 64]`` a list. Not validated:
    callers pass the result to :func:`validate` once their own settings are in."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not section.key=YAML (e.g. finetune.epochs=60)")
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node[last] = yaml.safe_load(value)
    return config


def config_hash(config: dict, sections: list[str] | None = None, n_hex: int = 16) -> str:
    """Stable hash of the whole config or of the named top-level sections."""
    part = config if sections is None else {k: config.get(k) for k in sections}
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:n_hex]
