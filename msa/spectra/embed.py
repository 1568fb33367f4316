"""``msa embed``: each star's encoder representation, to cluster, search neighbours or fine-tune elsewhere.

Output (Parquet, one row per input star, input order, ``source_id`` checked as in prediction):
``source_id``; ``has_xp`` (the input had an XP spectrum); then, for model *k* of ``--models`` (in
the order given; metadata ``model_paths``), ``latent_length`` columns ``emb{k}_000`` …
(float32): the encoder's output, the ``encoder_widths[-1]``-dimensional vector every head and the
decoder read (64 in the demo). The pretrained encoder (``results/pretrain/model.pt``) is the
label-free representation; fine-tuned members' encoders have moved towards their label set. With
``--hide-xp`` the XP block is hidden: the representation a photometry-only star would get.
Vectors of different models live in different spaces: compare a star's ``emb0_*`` with other
stars' ``emb0_*`` only. Metadata: ``latent_dim``, ``n_models``, ``model_sha256``, ``model_paths``.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa

from msa import __version__
from msa.config import config_hash
from msa.data.parquet_stream import stream_to_parquet
from msa.data.star_sources import write_each_source
from msa.data.store import SOURCE_ID
from msa.nn.autoencoders import Autoencoders
from msa.spectra.reconstruct import add_source_arguments, load_for_command

log = logging.getLogger(__name__)


def embedding_column(model: int, i: int) -> str:
    return f"emb{model}_{i:03d}"


def output_schema(n_models: int, latent_dim: int, metadata: dict[str, str]) -> pa.Schema:
    fields = [pa.field(SOURCE_ID, pa.int64(), nullable=False), pa.field("has_xp", pa.bool_(), nullable=False)]
    fields += [pa.field(embedding_column(k, i), pa.float32()) for k in range(n_models) for i in range(latent_dim)]
    return pa.schema(fields, metadata=metadata)


def embed_chunk(raw, aes: Autoencoders, schema: pa.Schema, *, hide_xp: bool, batch_size: int) -> pa.Table:
    x = aes.scaled_inputs(raw)
    xp_idx = aes.layout.xp_indices
    hidden = aes.xp_mask() if hide_xp else None
    _, latent = aes.run(x, hidden, batch_size=batch_size)
    columns = [pa.array(np.asarray(raw[SOURCE_ID], dtype=np.int64)),
               pa.array(np.isfinite(x[:, xp_idx]).any(axis=1))]
    columns += [pa.array(latent[k, :, i]) for k in range(latent.shape[0]) for i in range(latent.shape[2])]
    return pa.Table.from_arrays(columns, schema=schema)


def embed_file(source, is_shard: bool, aes: Autoencoders, out, *, hide_xp: bool, chunk_rows: int,
               batch_size: int, metadata: dict[str, str], allow_missing: bool = False):
    """Write the embeddings of every star of a shard (``is_shard``) or a user's table to ``out``."""
    schema = output_schema(len(aes.models), aes.latent_dim, metadata)
    return stream_to_parquet(source, is_shard, aes.input_transform().store_columns, out, schema,
                             lambda raw: embed_chunk(raw, aes, schema, hide_xp=hide_xp, batch_size=batch_size),
                             chunk_rows=chunk_rows, allow_missing=allow_missing)


def add_arguments(parser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--hide-xp", action="store_true", help="hide every XP coefficient from the encoder")


def run(args) -> int:
    config, aes = load_for_command(args)
    section = config["embed"]

    def embed_one(source, out, shown):
        metadata = {"msa_version": __version__, "latent_dim": str(aes.latent_dim), "n_models": str(len(aes.models)),
                    "model_sha256": json.dumps(aes.sha256), "model_paths": json.dumps([str(p) for p in aes.paths]),
                    "config_hash": config_hash(config), "input_file": str(source),
                    "xp_hidden": json.dumps(bool(args.hide_xp)),
                    "columns": "emb{k}_{i:03d}: dimension i of model k's encoder output"}
        summary = embed_file(source, args.table is None, aes, out, hide_xp=args.hide_xp,
                             chunk_rows=section["chunk_rows"], batch_size=section["batch_size"], metadata=metadata,
                             allow_missing=args.allow_missing_columns)
        log.info("%s: %d stars × %d model(s) × %d dimensions in %.1f s (%.0f stars/s)", shown, summary.n_rows,
                 len(aes.models), aes.latent_dim, summary.seconds, summary.stars_per_second)

    write_each_source(args, embed_one, "embed")
    return 0
