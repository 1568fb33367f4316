# Resources that name an environment variable ($NAME, profiles/slurm's account and partitions):
# Snakemake expands it in each job, but an unset one stays the literal text and would reach sbatch
# as the account or partition. Refused here, before any job, with the variable named.

import os
import re

ENVIRONMENT_REFERENCE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def profile_resources():
    """(rule or None for every rule, resource name, its value as the profile wrote it)."""
    settings = workflow.resource_settings
    found = [(None, name, value) for name, value in (settings.default_resources or {}).items()]
    for rule_name, resources in (settings.overwrite_resources or {}).items():
        found += [(rule_name, name, value) for name, value in resources.items()]
    return [(rule_name, name, getattr(value, "raw", value)) for rule_name, name, value in found]


def check_profile_environment():
    for rule_name, name, raw in profile_resources():
        for braced, plain in ENVIRONMENT_REFERENCE.findall(str(raw)):
            variable = braced or plain
            if variable not in os.environ:
                where = (
                    f"set-resources {rule_name}:{name}"
                    if rule_name
                    else f"default-resources {name}"
                )
                raise WorkflowError(
                    f"the profile's {where} = {raw} reads the environment variable {variable}, "
                    f"which is not set: export {variable}=<your site's value> first "
                    "(profiles/slurm's header says which)"
                )


check_profile_environment()
