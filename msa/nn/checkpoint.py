"""Checkpoints: atomic writes, plain data only, refused against a different feature layout.

A checkpoint is a dict of tensors and plain Python data (no pickled objects), so it loads with
``torch.load(weights_only=True)``. Keys used by the stages:

``kind`` ("pretrain" / "finetune"), ``model`` (state dict), ``model_hparams`` (kwargs that rebuild
the model), ``optimizer``, ``scheduler``, ``step``, ``epoch``, ``rng`` (torch / numpy / python
states), ``config`` (the resolved config section), ``layout`` (``Layout.to_dict()``), ``scaler``
(``Scaler.to_dict()``), ``msa_version``, and whatever a stage adds.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from msa import __version__
from msa.data.layout import Layout
from msa.data.store import atomic_path
from msa.errors import InputError

log = logging.getLogger(__name__)


class CheckpointError(InputError, RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the current layout."""


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file, then rename)."""
    payload = {**payload, "msa_version": __version__}
    # serialised in memory, then written with Python's own write: a full disk is then an OSError
    # naming the file (atomic_path), not torch's "inline_container.cc ... unexpected pos"
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load with ``weights_only=True``: opening a checkpoint never runs pickled code."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch's zip format, or a legacy pickle
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it starts with {head!r}); give the "
                              "model.pt files `msa finetune` or `msa pretrain` wrote")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"cannot load checkpoint {path}: {err}") from err


def set_aside_if_corrupt(path: str | Path) -> bool:
    """Whether an in-progress checkpoint at ``path`` loads; an unreadable one (a write cut short by
    a kill, a full disk) is renamed to ``NAME.corrupt-TIME`` with a warning, so the run starts
    afresh instead of every retry failing on it."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        load_checkpoint(path)
        return True
    except CheckpointError as err:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.replace(path, aside)
        except FileNotFoundError:  # another rank moved it first
            return False
        log.warning("%s; moved it to %s and starting afresh (delete it once inspected)", err, aside)
        return False


def check_layout(checkpoint: dict, layout: Layout, path: str | Path) -> None:
    """Raise with a description of the difference if the checkpoint was made for another layout."""
    saved = Layout.from_dict(checkpoint["layout"])
    difference = saved.diff(layout)
    if difference:
        raise CheckpointError(
            f"checkpoint {path} was trained with a different feature layout: {difference}. "
            "Use the config it was trained with, or retrain from scratch."
        )


def rng_state() -> dict:
    """The global random states (torch, numpy, python), as plain data. Stages that keep their own
    ``np.random.Generator`` store ``generator.bit_generator.state`` (plain ints) beside it."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"] = {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"])}
    state = {"torch": torch.get_rng_state(), "numpy": np_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
                         "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def file_sha256(path: str | Path, n_hex: int = 16) -> str:
    """Short content hash of a file (identifies a model in catalogue metadata)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n_hex]
