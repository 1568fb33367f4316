"""The calibration stage: split-conformal offsets per group (calibrate, groups), the member
mixture that every later stage predicts with (ensemble), faint copies of bright stars (emulation),
how well the labelled stars cover a star (support)."""

# Other stages import only these names, from the package itself, never its modules.
from msa.calibration.basis import BASES, BASIS_MEANING, interval_basis
from msa.calibration.calibrate import (apply_calibration, interval_coverage, load_calibration,
                                       parallax_label_columns, star_groups)
from msa.calibration.emulation import ErrorRelation, emulate_faint_stars
from msa.calibration.ensemble import Ensemble, combine_members
from msa.calibration.support import SupportError, SupportIndex, support_index_path
from msa.calibration.surveys import survey_sources

__all__ = ["apply_calibration", "BASES", "BASIS_MEANING", "combine_members", "emulate_faint_stars", "Ensemble",
           "ErrorRelation", "interval_basis", "interval_coverage", "load_calibration", "parallax_label_columns",
           "star_groups", "SupportError", "SupportIndex", "support_index_path", "survey_sources"]
