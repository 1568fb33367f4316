"""The data layer: Gaia Archive and survey readers, ingestion, the HDF5 shard store, tables, ids,
splits, HEALPix, labels, the feature layout and its derived features, scaling, streaming batches and
synthetic skies. It imports nothing above it (no network, no stage)."""
