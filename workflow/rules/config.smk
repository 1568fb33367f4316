# The config checked and completed without importing msa: under `--sdm conda` the package is in
# the jobs' environment, not in the snakemake process. The schema is the file msa validates against
# (workflow/schemas/config.schema.yaml links to msa/schemas/), read here as a file; jsonschema and
# yaml come with Snakemake. Defaults are filled as msa.config.validate fills them (a test compares
# the two), and a wrong key is one short line, not snakemake.utils.validate's dump of the schema.

import copy

import jsonschema
import yaml

CONFIG_SCHEMA = Path(workflow.basedir) / "schemas" / "config.schema.yaml"
# pattern-checked names become folders under results/
NAME_HINT = "; rename it with letters, digits, '_', '.' and '-' only (it becomes a folder name)"


def fill_schema_defaults(instance, schema):
    """`instance` with the schema's default for every absent key of every object, nested."""
    if not isinstance(instance, dict) or schema.get("type") != "object":
        return instance
    for key, prop in (schema.get("properties") or {}).items():
        if key not in instance and "default" in prop:
            instance[key] = copy.deepcopy(prop["default"])
        if key in instance:
            instance[key] = fill_schema_defaults(instance[key], prop)
    return instance


def resolved_config(config, schema_path, source):
    """A copy of `config` with every default filled; a WorkflowError naming each wrong key."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    resolved = fill_schema_defaults(copy.deepcopy(dict(config)), schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(resolved), key=lambda e: list(map(str, e.path)))
    if errors:
        lines = [
            f"  {'.'.join(map(str, e.path)) or '(top level)'}: {e.message}"
            + (NAME_HINT if e.validator == "pattern" else "")
            for e in errors[:10]
        ]
        raise WorkflowError(
            f"{source} does not follow the MSA config schema ({schema_path}):\n"
            + "\n".join(lines)
            + "\nSee config/README.md for every key and its meaning."
        )
    return resolved
