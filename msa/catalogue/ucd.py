"""IVOA Unified Content Descriptors (UCD1+) of the catalogue's columns, so VO tools (TOPCAT, VizieR,
astroquery) know a column's meaning without its name: ``pos.eq.ra;meta.main`` for the position,
``phys.temperature.effective`` for T_eff, and so on.

A label's median (``_q50``) carries the label's UCD; its 16th and 84th percentiles add
``stat.min`` and ``stat.max`` (the bounds of the central 68 % interval, as Gaia DR3's ``_lower`` and
``_upper``). A column this module does not name gets a UCD from its type, so none is without one.
"""

from __future__ import annotations

import pyarrow as pa

LABEL_UCDS = {
    "teff": "phys.temperature.effective",
    "logg": "phys.gravity",
    "fe_h": "phys.abund.Fe",
    "m_h": "phys.abund.Z",
    "mh": "phys.abund.Z",
    "alpha_m": "phys.abund",
    "alpha_fe": "phys.abund",
    "age": "time.age",
    "mass": "phys.mass",
    "radius": "phys.size.radius",
    "parallax": "pos.parallax",
    "distance": "pos.distance",
}
QUANTILE_UCDS = {"q16": ";stat.min", "q50": "", "q84": ";stat.max"}
COLUMN_UCDS = {
    "_healpix_29": "pos.healpix",
    "source_id": "meta.id;meta.main",
    "ra": "pos.eq.ra;meta.main",
    "dec": "pos.eq.dec;meta.main",
    "has_xp": "meta.code",
    "n_inputs": "meta.number",
    "flag_too_few_inputs": "meta.code.qual",
    "n_inputs_rejected": "meta.number",
    "flag_out_of_range": "meta.code.qual",
    "calibration_group": "meta.code.class",
    "in_training_sample": "meta.code",
    "interval_basis": "meta.code.class",
    "support": "meta.number",
    "low_support": "meta.code.qual",
}


def by_type(data_type: pa.DataType) -> str:
    """The UCD of a column known only by its type: a flag, a code, a count or a value."""
    if pa.types.is_boolean(data_type):
        return "meta.code"
    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type) or pa.types.is_dictionary(data_type):
        return "meta.code"
    if pa.types.is_integer(data_type):
        return "meta.number"
    return "stat.value"


def column_ucd(name: str, data_type: pa.DataType, labels) -> str:
    """UCD of catalogue column ``name`` (of ``data_type``) given the label set's ``labels``."""
    if name in COLUMN_UCDS:
        return COLUMN_UCDS[name]
    label, _, suffix = name.rpartition("_")
    if label in labels and suffix in QUANTILE_UCDS:
        return LABEL_UCDS.get(label, "stat.value") + QUANTILE_UCDS[suffix]
    return by_type(data_type)
