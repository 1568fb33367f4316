"""Where a catalogue came from: the software (msa version and git commit), the date, the config
and model identity, and the data release, as one flat dict of strings that the catalogue writes
into every partition's metadata (astropy's ``Table.meta``, pyarrow's key-values) and its summary.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

from msa import __version__

# the model-identity keys of the prediction files that the catalogue passes on
FROM_PREDICTIONS = ("msa_version", "label_set", "labels", "config_hash", "member_sha256", "calibration_sha256")


def git_commit(where: Path | None = None) -> str:
    """The commit of the checkout the ``msa`` package runs from, with ``-modified`` when tracked files
    differ from it; ``unknown`` for an installed package (no git checkout) or without git."""
    where = where or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-modified" if changed else commit


def provenance(prediction_metadata: dict[str, str], data_release: str, now: datetime | None = None) -> dict[str, str]:
    """Provenance of a catalogue built now from predictions with ``prediction_metadata``."""
    now = now or datetime.now(UTC)
    out = {k: prediction_metadata[k] for k in FROM_PREDICTIONS if k in prediction_metadata}
    out.update({"catalogue_msa_version": __version__, "msa_git_commit": git_commit(),
                "creation_date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "data_release": data_release})
    return out
