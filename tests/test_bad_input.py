"""Bad input, tried as a new user would: one case per kind, each through the `msa` command.

Every case asserts the exit status (2 = bad input), a one-line ``msa <command>: error: ...``
message naming the file or key, that no output or temporary is left, that a pre-existing output
is unchanged and that no input was modified. Cases that must give an exact result say so.

Cases of issue 27 (reliability, second round), what happened before and what happens now:

| case | before | now | test |
|---|---|---|---|
| ``--out-dir`` of ``catalog`` / ``predict`` / ``embed`` / ``reconstruct --shards`` holds a file msa did not write (a note, a subfolder, an empty folder, a foreign Parquet file) | the folder was replaced whole: the user's files deleted, the summary beside it overwritten, rc 0 | rc 2 before any work, naming the file: move it out or choose another folder; a rerun over the command's own output (and Snakemake's ``.snakemake_timestamp``) still replaces it | ``test_catalog_out_dir_holding_other_files_is_refused``, ``test_catalog_reruns_over_its_own_catalogue``, ``test_predict_out_dir_holding_other_files_is_refused_and_its_own_is_replaced`` |
| ``predict --table`` with a boolean ``phot_g_mean_mag`` column (Parquet; FITS/ECSV booleans and text alike) | read as G = 0 or 1 mag, rc 0 | rc 2: ``column 'phot_g_mean_mag' has type bool, not a number``, naming the file | ``test_predict_refuses_bad_input[table-boolean-magnitude]`` |
| ``reconstruct`` of a star with G = 1e300 (or -1e300, inf) | 110 coefficients of 0 (inf for -1e300) | NaN coefficients; every other star unchanged | ``test_reconstruct_writes_nan_for_a_star_it_cannot_reconstruct`` |
| ``predict`` / ``evaluate`` with a calibration made for other members (sha256s not those the calibration JSON records, or more or fewer members) | applied, and the coverage guarantee written into the output | rc 2 naming the member file and the calibration file: calibrate these members or pass the ones it was made for | ``test_predict_refuses_bad_input[calibration-of-other-members]``, ``[calibration-of-more-members]``, ``test_evaluate_refuses_a_calibration_of_other_members`` |
| ``finetune`` killed, rerun with another ``--pretrained`` (or an edited label catalogue, scaler or shard list) | the old run's state resumed: only the config sections were compared | the state is ignored and the member starts afresh, the log naming the changed input | ``tests/test_finetune.py::test_a_rerun_with_other_inputs_starts_afresh`` |
| a second ``snakemake`` with another ``--configfile`` while a run holds the lock (or any dry run) | it had rewritten ``results/.msa/config.yaml`` while parsing, before failing on the lock: the running run's later jobs read the other config (41 catalogue partitions instead of 9) | the file is written in ``onstart``, after the lock is taken, and never by a dry run: the running run's file is unchanged | ``test_a_second_snakemake_refused_by_the_lock_leaves_the_running_config_alone``, ``tests/test_workflow.py::test_resolved_config_is_written_once_with_every_default`` |
| ``predict --table`` with a sentinel or absurd finite input (K/RP = -999, BP = -9999 or 1e10, bp_3 = 1e8, parallax = 1e8, G = 99) | used as a real value: T_eff -2556 K, -49,299 K, -9.4e10 K, 320,869 K, no flag | the value is missing (sentinels exactly; magnitudes outside [-10, 40]; parallax, proper motions beyond physical limits; more than 1000 robust scales from the scaler's centre): the star's prediction is the one it gets with the value empty, ``n_inputs_rejected`` counts it, the log gives the total | ``test_predict_treats_a_sentinel_or_absurd_input_as_missing`` |
| one star with bp = 1e30 in a ``predict`` file (the workflow: a 32-shard batch) | the whole file failed: "non-finite predictions" | the input is missing (above); a prediction that is still not finite or outside the label's physical range (``msa.data.plausible.LABEL_RANGES``, by name and ``predict.label_units``) is NaN with ``flag_out_of_range``; the file is written | ``test_predict_treats_a_sentinel_or_absurd_input_as_missing[bp_3-1e+30]``, ``test_predict_writes_nan_and_flags_a_star_whose_prediction_is_absurd`` |
| the class: random finite extremes (any float32) and sentinels in any feature of any star | absurd values out, unflagged | every star's quantiles are finite and in each label's physical range, or NaN and flagged (``flag_too_few_inputs`` or ``flag_out_of_range``); stars not edited have no rejected input | ``test_predict_output_is_physical_or_nan_and_flagged_whatever_the_inputs`` (hypothesis) |
| survey columns with -999, -9999 or 1e8 at ingest | stored as magnitudes (pretraining loss 4.6e7 instead of 0.8) | stored as missing; ``survey_<name>_rejected`` in the shard's counts, the columns and counts in the log | ``test_ingest_stores_survey_sentinels_and_absurd_values_as_missing`` |
| survey store names with ``/`` or ``.`` (``columns: {j_m: J/x}``, ``errors: {j_msig: J.err}``) | ``/`` made an HDF5 group: ingest passed, predict failed with ``TypeError``; ``.`` failed at ingest | the schema refuses them (msa and the workflow), naming the key: ``ingest.surveys.tmass.columns.j_m: 'J/x' should not be valid under {'pattern': '[/.]'}`` | ``test_ingest_refuses_bad_input[survey-store-name-with-slash]``, ``[survey-store-name-with-dot]`` |
| ``ingest`` on a full disk (simulated: the HDF5 writer raises ENOSPC after writing part of the shard; a tiny filesystem needs root) | rc 139 and ~100 h5py tracebacks on a real full disk; with the error raised, ``OSError: [Errno 28] No space left on device`` naming no file | one line, rc 1: ``DiskFullError: no space left on the device writing .../s.h5 ... (nothing was written)``; no shard, no temporary (``atomic_path``, so every writer of the package) | ``test_ingest_on_a_full_disk_says_so_naming_the_file_and_leaves_nothing`` |
| ``finetune`` / ``pretrain`` saving a checkpoint on a full disk | torch's ``inline_container.cc ... unexpected pos`` | the checkpoint is serialised in memory and written by Python: ``DiskFullError`` naming the file, no temporary left | ``test_a_checkpoint_save_on_a_full_disk_names_the_file`` |
| a JSON file as ``--members`` | torch's message advising the unsafe ``weights_only=False`` | rc 2: ``member.json is not a PyTorch checkpoint (it starts with b'{"me'); give the model.pt files ...`` | ``test_a_json_file_as_members_is_refused_clearly`` |
| ``abc`` in a label column of the label catalogue | ``ValueError: could not convert string to float: 'abc'``, no file or column | ``LabelError`` (rc 2): ``label catalogue .../labels.csv: column 'teff' row 1 is not a number ('abc')`` | ``test_label_catalogue_with_text_in_a_label_column_names_file_column_and_row`` |
| ``inf`` / ``1e300`` labels (train split) | fine-tuning failed: "lower the learning rate or enable grad_clip" | dropped as missing labels are (infinite, or beyond 1e30: a catalogue's unit is not known, so no physical range), the log giving the count, the column and source_ids | ``test_infinite_and_absurd_labels_are_dropped_with_a_count`` |
| dec > 90 in a prediction file given to ``msa catalog`` | ``ValueError: Latitude angle(s) ...``, rc 1, no file or star | rc 2: ``bad-dec.parquet: 1 star(s) with dec outside [-90, 90] deg, e.g. source_id [...] (dec [95.0])``; nothing written | ``test_catalog_with_dec_above_90_names_the_file_and_the_star`` |
| a UTF-8 BOM at the start of an XP or gaia_source CSV (one, the other, both) | refused: missing column 'source_id' (the header's first name read U+FEFF + 'source_id') | accepted: the shard equals the one without a BOM | ``test_a_utf8_bom_in_the_xp_or_gaia_source_file_is_accepted`` |
| a symlinked ``--out-dir`` (``catalog``; ``predict``/``embed``/``reconstruct --shards`` share ``atomic_dir``) | the link was replaced by a real folder: the output landed beside the link, on the wrong filesystem | written through the link: the target holds the output, the link stays, the build's temporaries were beside the target | ``test_a_symlinked_out_dir_is_written_through`` |
| tests that could not fail: the magnitude error of a flux S/N | tests computed it with ``MAG_PER_LN`` itself, so a wrong constant stayed self-consistent | pinned with literals: S/N 100 → 0.010857 mag, 50 → 0.021715 (fails with 1/ln 10) | ``tests/test_emulation.py::test_magnitude_error_of_a_flux_signal_to_noise_is_pinned_by_literals`` |
| tests that could not fail: ``QuantileHead`` ordering | no direct test | random and adversarial weights (biases pushing q16 above q50), latents of every scale: q16 ≤ q50 ≤ q84 (fails with the softplus removed) | ``tests/test_model.py::test_quantile_head_orders_its_quantiles_whatever_the_weights`` |
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from msa.cli import main
from msa.data.gaia import XP_LIST_COLUMNS, iter_xp
from msa.data.store import Shard, atomic_path, check_out_path, sweep_temporaries, write_shard
import test_catalog
from test_catalog import OPTIONS

REPO = Path(__file__).resolve().parents[1]
# ten real DR3 stars in the Archive CSV schema, shipped with the tests
XP_SAMPLE = REPO / "tests" / "data" / "gaia_archive_samples" / "example_file_coeff.csv"
SOURCE_COLUMNS = ["ra", "dec", "parallax", "parallax_error", "pmra", "pmra_error", "pmdec", "pmdec_error",
                  "phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag"]
OLD_OUTPUT = b"an output written before: must survive a failed run"
predictions = test_catalog.predictions  # a fixture, used by name (an assignment: no unused import)


def xp_lines() -> list[str]:
    return XP_SAMPLE.read_text().splitlines(keepends=True)


def xp_ids() -> list[int]:
    return [int(line.split(",", 1)[0]) for line in xp_lines()[1:]]


def write_xp(path: Path, edit: Callable[[list[str]], list[str]] = lambda lines: lines) -> Path:
    path.write_text("".join(edit(xp_lines())))
    return path


def write_source(path: Path, ids=None, **frame_edits) -> Path:
    ids = xp_ids() if ids is None else ids
    frame = pd.DataFrame({"source_id": ids, **{c: np.linspace(1, 2, len(ids)) for c in SOURCE_COLUMNS}})
    text = frame.to_csv(index=False)
    for old, new in frame_edits.get("replace", []):
        text = text.replace(old, new, 1)
    path.write_text(text)
    return path


def write_survey(path: Path, ids=None, replace=()) -> Path:
    ids = xp_ids() if ids is None else ids
    text = pd.DataFrame({"source_id": ids, "j_m": np.linspace(10, 11, len(ids))}).to_csv(index=False)
    for old, new in replace:
        text = text.replace(old, new, 1)
    path.write_text(text)
    return path


def float_text_id(lines: list[str], row: int = 3) -> list[str]:
    """Row ``row``'s source_id written as float text, as a spreadsheet round trip does."""
    sid, rest = lines[row + 1].split(",", 1)
    return [*lines[:row + 1], f"{sid}.0,{rest}", *lines[row + 2:]]


def ingest(tmp: Path, *, xp=None, source=None, survey=None, out=None, extra=()) -> list[str]:
    xp = xp or write_xp(tmp / "XpContinuousMeanSpectrum_s.csv")
    source = source or write_source(tmp / "GaiaSource_s.csv")
    argv = ["ingest", "--xp", str(xp), "--source", str(source), "--out", str(out or tmp / "out" / "s.h5"),
            "--no-progress", *extra]
    if survey is not None:
        argv += ["--photometry", f"tmass={survey}"]
    return argv


@dataclass
class Case:
    id: str
    argv: Callable[[Path], list[str]]  # builds the inputs in a folder, returns the command line
    message: str  # regex the one-line message must match (it names the file or key)
    rc: int = 2
    out: str = "out/s.h5"  # the output path the case would write


def _hard_link_out(tmp: Path) -> list[str]:
    xp = write_xp(tmp / "XpContinuousMeanSpectrum_s.csv")
    (tmp / "out").mkdir()
    os.link(xp, tmp / "out" / "s.h5")
    return ingest(tmp, xp=xp)


def _config(tmp: Path, config: dict) -> list[str]:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["ingest", "--config", str(path), "--xp", str(write_xp(tmp / "Xp_s.csv")),
            "--out", str(tmp / "out" / "s.h5"), "--no-progress"]


INGEST_CASES = [
    # --- classes that failed before (issue 10) ---
    Case("xp-float-text-id", lambda t: ingest(t, xp=write_xp(t / "Xp_s.csv", float_text_id)),
         r"Xp_s\.csv: column 'source_id' row 3: '\d+\.0' is not an integer"),
    Case("source-float-text-id", lambda t: ingest(t, source=write_source(
        t / "GaiaSource_s.csv", replace=[(str(xp_ids()[2]) + ",", str(xp_ids()[2]) + ".0,")])),
        r"GaiaSource_s\.csv: column 'source_id' row 2: '\d+\.0' is not an integer"),
    Case("survey-float-text-id", lambda t: ingest(t, survey=write_survey(
        t / "tmass.csv", replace=[(str(xp_ids()[4]) + ",", str(xp_ids()[4]) + ".0,")])),
        r"tmass\.csv: column 'source_id' row 4: '\d+\.0' is not an integer"),
    Case("survey-exponent-id", lambda t: ingest(t, survey=write_survey(
        t / "tmass.csv", replace=[(str(xp_ids()[0]) + ",", "1.908095850396091e18,")])),
        r"tmass\.csv: column 'source_id' row 0: '1\.908095850396091e18' is not an integer"),
    Case("survey-matches-no-star", lambda t: ingest(t, survey=write_survey(t / "tmass.csv", ids=[1, 2, 3])),
         r"survey 'tmass' \(.*tmass\.csv\): only 0 of 10 stars .*min_survey_match_fraction"),
    Case("out-is-an-input", lambda t: ingest(t, out=t / "GaiaSource_s.h5",
                                             source=write_source(t / "GaiaSource_s.h5")),
         r"--out .*GaiaSource_s\.h5 is the input .*GaiaSource_s\.h5", out="GaiaSource_s.h5"),
    Case("out-hard-link-to-input", _hard_link_out, r"--out .*s\.h5 is the input .*XpContinuousMeanSpectrum_s\.csv"),
    Case("out-wrong-suffix", lambda t: ingest(t, out=t / "out" / "s.csv"),
         r"--out .*s\.csv: expected a file ending in \.h5", out="out/s.csv"),
    Case("id-above-int64", lambda t: ingest(t, xp=write_xp(
        t / "Xp_s.csv", lambda ls: [ls[0], "99999999999999999999" + ls[1][ls[1].index(","):], *ls[2:]])),
        r"Xp_s\.csv: column 'source_id' row 0: '99999999999999999999' exceeds the int64 range"),
    Case("source-fits-that-is-csv", lambda t: ingest(t, source=write_source(t / "GaiaSource_s.fits")),
         r"GaiaSource_s\.fits: .*(FITS|fits)"),
    Case("label-set-name-escapes-results", lambda t: _config(t, {"label_sets": {"../evil": ["teff"]}}),
         r"config\.yaml .*label_sets.*\.\./evil"),
    # issue 27: a '/' made an HDF5 group (ingest passed, predict failed with TypeError), '.' failed to write
    Case("survey-store-name-with-slash", lambda t: _config(t, {"ingest": {"surveys": {"tmass": {
        "path": str(write_survey(t / "tmass.csv")), "columns": {"j_m": "J/x"}}}}}),
        r"config\.yaml does not follow .*ingest\.surveys\.tmass\.columns\.j_m: 'J/x' should not be valid"),
    Case("survey-store-name-with-dot", lambda t: _config(t, {"ingest": {"surveys": {"tmass": {
        "path": str(write_survey(t / "tmass.csv")), "columns": {"j_m": "J"}, "errors": {"j_msig": "J.err"}}}}}),
        r"config\.yaml does not follow .*ingest\.surveys\.tmass\.errors\.j_msig: 'J\.err' should not be valid"),
    # --- classes that already worked: kept working ---
    Case("truncated-gzip", lambda t: ingest(t, xp=_truncated(t)),
         r"Xp_s\.csv\.gz: the file is truncated or corrupt .*download it again"),
    Case("wrong-list-length", lambda t: ingest(t, xp=write_xp(  # first BP value of row 0 dropped
        t / "Xp_s.csv", lambda ls: [ls[0], re.sub(r"\(([^,]*), ", "(", ls[1], count=1), *ls[2:]])),
        r"Xp_s\.csv: column 'bp_coefficients' row 0 has 54 values, expected 55"),
    Case("duplicate-id", lambda t: ingest(t, xp=write_xp(t / "Xp_s.csv", lambda ls: [*ls, ls[1]])),
         r"Xp_s\.csv: 1 duplicate source_id"),
    Case("missing-source-column", lambda t: ingest(t, source=_source_without(t, "parallax")),
         r"GaiaSource_s\.csv: missing required column\(s\) \['parallax'\]"),
    Case("xp-star-not-in-source", lambda t: ingest(t, source=write_source(t / "GaiaSource_s.csv",
                                                                          ids=xp_ids()[1:])),
         r"1 of 10 stars in .*XpContinuousMeanSpectrum_s\.csv are not in .*GaiaSource_s\.csv"),
    Case("config-typo", lambda t: _config(t, {"ingest": {"chunk_row": 10}}),
         r"config\.yaml does not follow the MSA config schema: ingest: .*'chunk_row' was unexpected"),
    Case("missing-xp-file", lambda t: ingest(t, xp=t / "nope.csv"), r"nope\.csv: xp file not found; fix the path"),
    Case("empty-xp-file", lambda t: ingest(t, xp=_empty(t / "Xp_s.csv")), r"Xp_s\.csv: no header line"),
    Case("non-numeric-source-value", lambda t: ingest(t, source=write_source(
        t / "GaiaSource_s.csv", replace=[(",1.0,", ",abc,")])),
        r"GaiaSource_s\.csv: column 'ra' holds a non-numeric value at row 0 \(value 'abc'\)"),
]


def _truncated(tmp: Path) -> Path:
    import gzip
    whole = gzip.compress("".join(xp_lines()).encode())
    path = tmp / "Xp_s.csv.gz"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _source_without(tmp: Path, column: str) -> Path:
    path = write_source(tmp / "GaiaSource_s.csv")
    pd.read_csv(path, dtype={"source_id": str}).drop(columns=[column]).to_csv(path, index=False)
    return path


def file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check_refused(tmp: Path, case: Case, argv: list[str], capsys) -> None:
    """Run ``argv`` over the inputs in ``tmp`` and check everything a refusal promises."""
    out = tmp / case.out
    pre_existing = not out.exists()
    if pre_existing:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(OLD_OUTPUT)
    before = file_digests(tmp)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == case.rc, err
    assert len(err) == 1, err  # one line: no traceback, no log noise
    assert err[0].startswith(f"msa {argv[0]}: error: ")
    assert re.search(case.message, err[0]), err[0]
    assert file_digests(tmp) == before  # no input modified, the old output unchanged, nothing new
    if pre_existing:
        assert out.read_bytes() == OLD_OUTPUT
    assert not list(tmp.rglob("*.tmp"))


@pytest.fixture(autouse=True)
def quiet_logs(caplog):
    """The command's log goes to the log, not stderr: the error line must stand alone."""
    caplog.set_level("CRITICAL")


@pytest.mark.parametrize("case", INGEST_CASES, ids=lambda c: c.id)
def test_ingest_refuses_bad_input(case, tmp_path, capsys):
    check_refused(tmp_path, case, case.argv(tmp_path), capsys)


def test_header_only_xp_gives_an_exact_empty_shard_and_a_warning(tmp_path, caplog):
    caplog.set_level("WARNING")
    xp = write_xp(tmp_path / "Xp_s.csv", lambda lines: lines[:1])
    argv = ingest(tmp_path, xp=xp, extra=["--no-keep-sources-without-xp"])
    assert main(argv) == 0
    with Shard(tmp_path / "out" / "s.h5") as shard:
        assert shard.n_rows == 0
    assert "no XP rows" in caplog.text


def test_survey_join_is_reported_in_the_shard(tmp_path):
    survey = write_survey(tmp_path / "tmass.csv", ids=[*xp_ids()[:6], 7, 8])
    assert main(ingest(tmp_path, survey=survey)) == 0
    with Shard(tmp_path / "out" / "s.h5") as shard:
        counts = yaml.safe_load(shard.attrs["counts"])
        assert np.isnan(shard.read(["j_m"])["j_m"]).sum() == 4
    assert (counts["survey_tmass_rows"], counts["survey_tmass_matched"], counts["survey_tmass_unmatched"]) == (8, 6, 2)


def test_truncated_gzip_exits_cleanly_in_a_fresh_process(tmp_path):
    """The reader threads are shut down on the error: exit 2, not SIGABRT (134)."""
    argv = ingest(tmp_path, xp=_truncated(tmp_path))
    for _ in range(3):  # the abort was intermittent
        done = subprocess.run([sys.executable, "-m", "msa.cli", *argv], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
        assert done.returncode == 2, done.stderr
        assert "terminate called" not in done.stderr
        assert done.stderr.strip().startswith("msa ingest: error: ") and "Traceback" not in done.stderr


def test_a_failed_run_exits_1_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import msa.data.ingest

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(msa.data.ingest, "ingest_shard", disk_full)
    assert main(ingest(tmp_path)) == 1
    assert capsys.readouterr().err.strip() == ("msa ingest: error: OSError: [Errno 28] No space left on device "
                                               "(run failed; --debug shows the traceback)")
    with pytest.raises(OSError):
        main(["--debug", *ingest(tmp_path)])


# --- msa predict --table / --out ------------------------------------------------------------------

@pytest.fixture()
def predict_setup(tmp_path):
    import json

    from test_ensemble import small_layout, unit_scaler, write_member
    from test_predict import CALIBRATION, star_columns, write_config
    layout = small_layout()
    members = [write_member(tmp_path / "member-0.pt", layout, unit_scaler(layout), seed=0,
                            label_centre=[4800.0, 2.5, 1.0], label_scale=[700.0, 1.0, 0.4])]
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps(CALIBRATION))
    table = tmp_path / "stars.csv"
    pd.DataFrame(star_columns(150)).to_csv(table, index=False)
    config = write_config(tmp_path)
    return {"members": members, "calibration": calibration, "table": table, "config": config}


def predict_argv(s, table=None, out=None) -> list[str]:
    return ["predict", "--config", s["config"], "--label-set", "spectro", "--members", *map(str, s["members"]),
            "--calibration", str(s["calibration"]), "--table", str(table or s["table"]),
            "--out", str(out or Path(s["table"]).parent / "out" / "p.parquet"), "--device", "cpu"]


def _edit_table(s, edit) -> Path:
    text = Path(s["table"]).read_text().splitlines(keepends=True)
    path = Path(s["table"]).with_name("edited.csv")
    path.write_text("".join(edit(text)))
    return path


PREDICT_CASES = [
    Case("table-float-text-id", lambda s: predict_argv(s, _edit_table(s, lambda ls: [
        ls[0], ls[1], ls[2].replace(",", ".0,", 1), *ls[3:]])),
        r"edited\.csv: column 'source_id' row 1: '\d+\.0' is not an integer", out="out/p.parquet"),
    Case("table-float-column-id", lambda s: predict_argv(s, _float_id_parquet(s)),
         r"floats\.parquet: column 'source_id' has type double, not integer", out="out/p.parquet"),
    Case("table-text-value", lambda s: predict_argv(s, _edit_table(s, lambda ls: [
        ls[0], ls[1], re.sub(r",[-0-9.e]+,", ",bright,", ls[2], count=1), *ls[3:]])),
        r"edited\.csv: column '\w+' row 1: 'bright' is not a number", out="out/p.parquet"),
    Case("table-header-only", lambda s: predict_argv(s, _edit_table(s, lambda ls: ls[:1])),
         r"edited\.csv: the table has no rows", out="out/p.parquet"),
    Case("table-truncated-gzip", lambda s: predict_argv(s, _truncated_table(s)),
         r"stars\.csv\.gz: cannot read the table .*is the file complete", out="out/p.parquet"),
    Case("out-is-the-table", lambda s: predict_argv(s, _parquet_table(s), out=_parquet_table(s)),
         r"--out .*stars\.parquet is the input .*stars\.parquet", out="stars.parquet"),
    Case("out-wrong-suffix", lambda s: predict_argv(s, out=Path(s["table"]).parent / "out" / "p.pt"),
         r"--out .*p\.pt: expected a file ending in \.parquet", out="out/p.pt"),
    # issue 27: a calibration made for other members was applied, its guarantee written
    Case("calibration-of-other-members", lambda s: predict_argv(_other_members_calibration(s)),
         r"member-0\.pt .*not among the members .*other-calibration\.json was made for", out="out/p.parquet"),
    Case("calibration-of-more-members", lambda s: predict_argv(_other_members_calibration(s, extra=True)),
         r"other-calibration\.json was made for 2 member\(s\), --members gives 1", out="out/p.parquet"),
    # issue 27: a boolean column was read as 0/1 (G = 0 or 1 mag)
    Case("table-boolean-magnitude", lambda s: predict_argv(s, _boolean_parquet(s)),
         r"bools\.parquet: column 'phot_g_mean_mag' has type bool, not a number", out="out/p.parquet"),
]


def _other_members_calibration(s, extra: bool = False) -> dict:
    """The setup with a calibration that records other members' sha256s (``extra``: these members
    and one more)."""
    import json

    from msa.nn.checkpoint import file_sha256
    calibration = json.loads(Path(s["calibration"]).read_text())
    mine = [file_sha256(m) for m in s["members"]]
    calibration["member_sha256"] = [*mine, "0123456789abcdef"] if extra else ["0123456789abcdef"]
    path = Path(s["calibration"]).with_name("other-calibration.json")
    path.write_text(json.dumps(calibration))
    return {**s, "calibration": path}


def test_evaluate_refuses_a_calibration_of_other_members(predict_setup, tmp_path):
    """``evaluate`` scored a calibration made for other members and reported its coverage as theirs."""
    from msa.calibration.calibrate import CalibrationError
    from msa.config import load_config
    from msa.evaluation.evaluate import evaluate

    s = _other_members_calibration(predict_setup)
    config = load_config(s["config"])
    config["labels"]["columns"] = {name: {"store": name} for name in config["label_sets"]["spectro"]}
    with pytest.raises(CalibrationError, match=r"member-0\.pt .*not among the members .*other-calibration\.json"):
        evaluate(config, "spectro", s["members"], s["calibration"], [], tmp_path / "eval", device="cpu")
    assert not (tmp_path / "eval").exists()


def _boolean_parquet(s) -> Path:
    path = Path(s["table"]).with_name("bools.parquet")
    frame = pd.read_csv(s["table"])
    frame["phot_g_mean_mag"] = frame["phot_g_mean_mag"] > 15
    frame.to_parquet(path)
    return path


def _truncated_table(s) -> Path:
    import gzip
    whole = gzip.compress(Path(s["table"]).read_bytes())
    path = Path(s["table"]).with_name("stars.csv.gz")
    path.write_bytes(whole[: len(whole) * 2 // 3])
    return path


def _parquet_table(s) -> Path:
    path = Path(s["table"]).with_name("stars.parquet")
    if not path.exists():
        pd.read_csv(s["table"]).to_parquet(path)
    return path


def _float_id_parquet(s) -> Path:
    path = Path(s["table"]).with_name("floats.parquet")
    frame = pd.read_csv(s["table"])
    frame["source_id"] = frame["source_id"].astype(float)
    frame.to_parquet(path)
    return path


@pytest.mark.parametrize("case", PREDICT_CASES, ids=lambda c: c.id)
def test_predict_refuses_bad_input(case, predict_setup, tmp_path, capsys):
    check_refused(tmp_path, case, case.argv(predict_setup), capsys)


def test_table_ids_above_2_53_round_trip_exactly(predict_setup, tmp_path):
    out = tmp_path / "out" / "p.parquet"
    assert main(predict_argv(predict_setup, out=out)) == 0
    expected = pd.read_csv(predict_setup["table"], dtype={"source_id": str})["source_id"].map(int).tolist()
    assert pd.read_parquet(out)["source_id"].tolist() == expected and min(expected) > 2**53
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _fit_scaler(tmp: Path, out: str) -> list[str]:
    write_shard(tmp / "shard.h5", {"source_id": np.arange(5), "phot_g_mean_mag": np.linspace(10, 12, 5)})
    (tmp / "config.json").write_text("{}")
    return ["fit-scaler", "--config", str(tmp / "config.json"), "--shards", str(tmp / "shard.h5"),
            "--out", str(tmp / out)]


OTHER_OUT_CASES = [
    Case("fit-scaler-out-is-the-config", lambda t: _fit_scaler(t, "config.json"),
         r"--out .*config\.json is the input .*config\.json", out="config.json"),
    Case("fit-scaler-out-is-a-shard", lambda t: _fit_scaler(t, "shard.h5"),
         r"--out .*shard\.h5: expected a file ending in \.json", out="shard.h5"),
]


@pytest.mark.parametrize("case", OTHER_OUT_CASES, ids=lambda c: c.id)
def test_other_stages_refuse_an_out_that_is_an_input(case, tmp_path, capsys):
    check_refused(tmp_path, case, case.argv(tmp_path), capsys)


# --- atomic writes: modes, temporaries, corrupt checkpoints ---------------------------------------

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_take_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_shard(tmp_path / "s.h5", {"source_id": np.arange(3)})
        with atomic_path(tmp_path / "d" / "x.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "s.h5").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "d" / "x.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_leaves_no_temporary_and_stale_ones_are_swept(tmp_path):
    out = tmp_path / "s.h5"
    dead = _dead_pid()
    host = socket.gethostname()
    stale = tmp_path / f".s.h5.{host}.{dead}.abc123.tmp"  # a killed writer's, on this machine
    live = tmp_path / f".s.h5.{host}.{os.getpid()}.def456.tmp"  # a running writer's: kept
    other = tmp_path / f".s.h5.otherhost.{dead}.ghi789.tmp"  # another machine's, recent: kept
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not out.exists() and not stale.exists() and live.exists() and other.exists()
    os.utime(other, (0, 0))  # a day old: its writer is gone whatever the machine
    assert sweep_temporaries(out) == [other]


def test_corrupt_in_progress_checkpoint_is_moved_aside(tmp_path, caplog):
    from msa.nn.checkpoint import save_checkpoint, set_aside_if_corrupt

    work = tmp_path / "work" / "state.pt"
    save_checkpoint(work, {"step": 3})
    assert set_aside_if_corrupt(work) and work.exists()  # a good one stays
    work.write_bytes(work.read_bytes()[:100])  # cut short by a kill
    caplog.set_level("WARNING")
    assert not set_aside_if_corrupt(work)
    assert not work.exists()
    aside = list(work.parent.glob("state.pt.corrupt-*"))
    assert len(aside) == 1 and "starting afresh" in caplog.text and str(aside[0]) in caplog.text


def test_out_check_is_independent_of_spelling(tmp_path):
    (tmp_path / "a").mkdir()
    source = tmp_path / "a" / "GaiaSource.h5"
    source.write_bytes(b"x")
    from msa.errors import InputError

    with pytest.raises(InputError, match="is the input"):
        check_out_path(tmp_path / "a" / ".." / "a" / "GaiaSource.h5", [source], (".h5",))


# --- the workflow: quoting and safe names ---------------------------------------------------------

PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


def test_every_path_and_wildcard_in_rule_shell_commands_is_quoted():
    shells = []
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text()
        for block in re.findall(r"shell:\n((?:\s+\".*\"\n?)+)", text):
            shells.append((smk.name, block))
    assert len(shells) >= 9
    for name, block in shells:
        for field in PLACEHOLDER.findall(block):
            if field == "params.launcher":  # the command itself (msa or torchrun ... msa)
                continue
            assert field.endswith(":q"), f"{name}: {{{field}}} is not quoted"


def test_workflow_refuses_a_raw_file_whose_name_is_a_command(tmp_path):
    from conftest import WorkflowDir

    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(XP_SAMPLE, raw / "XpContinuousMeanSpectrum_a$(touch PWNED)b.csv")
    wf = WorkflowDir(tmp_path / "wf", {"ingest": {"xp": str(raw / "XpContinuousMeanSpectrum_{shard}.csv")},
                                        "label_sets": {}})
    done = wf.snakemake("--cores", "1", check=False, timeout=300)
    assert done.returncode != 0
    assert "a$(touch PWNED)b" in done.stdout + done.stderr and "rename the file" in done.stdout + done.stderr
    assert not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()


def test_a_second_snakemake_refused_by_the_lock_leaves_the_running_config_alone(tmp_path, tiny_config):
    """Before: the resolved config was written while the Snakefile was parsed, so a second
    `snakemake` with another --configfile, refused by the lock, or a dry run, had already rewritten
    the file the running run's jobs read (its catalogue came out with 41 partitions instead of 9).
    Now it is written after the lock is taken (onstart), and never by a dry run.

    The running run is held at its first job: an `msa` on its PATH that waits to be killed."""
    import signal
    import time

    from conftest import BIN_PATH, SNAKEFILE, WorkflowDir, merge

    wf = WorkflowDir(tmp_path / "wf", tiny_config)
    resolved = wf.path / "results" / ".msa" / "config.yaml"
    assert wf.snakemake("--dry-run").returncode == 0 and not resolved.exists()  # a dry run writes nothing
    wf.write_config(merge(tiny_config, {"catalog": {"max_rows_per_partition": 7}}), "other.yaml")
    held = tmp_path / "held"
    held.mkdir()
    (held / "msa").write_text("#!/bin/sh\nexec sleep 600\n")
    (held / "msa").chmod(0o755)
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(wf.path),
               "--configfile", str(wf.path / "config.yaml"), "--workflow-profile", str(REPO / "profiles" / "default"),
               "--cores", "1"]
    first = subprocess.Popen(command, cwd=wf.path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "PATH": f"{held}{os.pathsep}{BIN_PATH}"}, start_new_session=True)
    try:
        locks = wf.path / ".snakemake" / "locks"
        deadline = time.monotonic() + 120
        while not (resolved.exists() and locks.is_dir() and any(locks.glob("*.lock"))):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never held the lock"
            time.sleep(0.05)
        running = resolved.read_bytes()
        assert yaml.safe_load(running)["catalog"]["max_rows_per_partition"] == 2000
        refused = wf.snakemake("--cores", "1", config="other.yaml", check=False)
        assert refused.returncode != 0 and "cannot be locked" in refused.stdout + refused.stderr
        assert resolved.read_bytes() == running
        assert wf.snakemake("--dry-run", config="other.yaml").returncode == 0
        assert resolved.read_bytes() == running
        assert first.poll() is None  # still running, its jobs still reading that file
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=60)


def test_label_set_names_that_escape_results_are_refused():
    from msa.config import ConfigError, validate

    for name in ("../evil", "a/b", "x y", ".hidden", "$(id)"):
        with pytest.raises(ConfigError, match="label_sets"):
            validate({"label_sets": {name: ["teff"]}})
    validate({"label_sets": {"spectro-v2.1_a": ["teff"]}, "labels": {"columns": {"teff": {"value": "teff"}}}})


# --- readers: arbitrary valid Archive rows round-trip exactly -------------------------------------

# Gaia DR3 ids lie far above 2**53, where a float would merge neighbours: draw mostly from there
source_ids = st.one_of(st.integers(min_value=2**53, max_value=2**63 - 1), st.integers(min_value=0, max_value=2**63 - 1))
coefficients = st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=55, max_size=55)


@st.composite
def rows(draw):
    """Archive rows: distinct int64 ids, an optional BP block, an RP block (float32 values)."""
    ids = draw(st.lists(source_ids, min_size=1, max_size=4, unique=True))
    return [(sid, draw(st.one_of(st.none(), coefficients)), draw(coefficients)) for sid in ids]


def _archive_list(values, style: str) -> str:
    if values is None:
        return ""
    body = (", " if style == "csv" else ",").join(repr(float(np.float32(v))) for v in values)
    return f'"({body})"' if style == "csv" else f'"[{body}]"'


# 55-float blocks overrun Hypothesis's buffer now and then; it counts those as filtered inputs
# (no assume() or filter here), so that health check would fail the test at random
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                 HealthCheck.filter_too_much])
@example(rows=[(2**60 + 1, None, [0.0] * 55), (2**63 - 1, [1.5] * 55, [-2.25] * 55)], style="csv")
@given(rows=rows(), style=st.sampled_from(["csv", "ecsv"]))
def test_valid_archive_rows_round_trip_exactly(tmp_path, rows, style):
    header = "source_id,bp_coefficients,bp_coefficient_errors,rp_coefficients,rp_coefficient_errors\n"
    lines = [f"{sid},{_archive_list(bp, style)},{_archive_list(bp, style)},{_archive_list(rp, style)},"
             f"{_archive_list(rp, style)}\n" for sid, bp, rp in rows]
    prefix = ""
    if style == "ecsv":
        prefix = "# %ECSV 1.0\n# ---\n# delimiter: ','\n"
    path = tmp_path / f"xp.{style}"
    path.write_text(prefix + header + "".join(lines))
    got = {k: np.concatenate([b[k] for b in iter_xp(path)]) for k in ("source_id", *XP_LIST_COLUMNS)}
    assert got["source_id"].tolist() == [r[0] for r in rows]
    for i, (_, bp, rp) in enumerate(rows):
        expected_bp = np.full(55, np.nan, np.float32) if bp is None else np.asarray(bp, np.float32)
        np.testing.assert_array_equal(got["bp_coefficients"][i], expected_bp)
        np.testing.assert_array_equal(got["rp_coefficients"][i], np.asarray(rp, np.float32))


def _dead_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()


def test_catalogue_folder_is_group_readable_and_killed_builds_are_swept(predictions, tmp_path):
    from msa.catalogue.catalog import build_catalog

    out = tmp_path / "catalog" / "spectro"
    out.parent.mkdir()
    killed = out.parent / f".spectro.{socket.gethostname()}.{_dead_pid()}.x1y2.tmp"  # a killed build's folder
    killed.mkdir()
    (killed / "part-0.parquet").write_bytes(b"partial")
    build_catalog(predictions["files"], out, "spectro", **OPTIONS)
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert not killed.exists() and not list(out.parent.glob(".*.tmp"))


# --- label catalogues: exact ids and the join report ----------------------------------------------

def _labelled_shard(tmp: Path):
    from test_ensemble import small_layout, unit_scaler
    from test_predict import star_columns

    from msa.data.features import FeatureTransform
    cols = star_columns(150)
    write_shard(tmp / "shard.h5", cols)
    layout = small_layout()
    return tmp / "shard.h5", FeatureTransform(layout, unit_scaler(layout), False), cols["source_id"]


def test_label_catalogue_with_float_text_id_is_refused(tmp_path):
    from msa.data.labels import LabelSource
    from msa.data.source_ids import SourceIdError

    ids = [str(2**60 + 1), str(2**60 + 3) + ".0", str(2**60 + 5)]
    (tmp_path / "labels.csv").write_text("source_id,teff\n" + "".join(f"{i},5000\n" for i in ids))
    with pytest.raises(SourceIdError, match=r"labels\.csv: column 'source_id' row 1: '\d+\.0' is not an integer"):
        LabelSource({"catalogue": str(tmp_path / "labels.csv"), "columns": {"teff": {"value": "teff"}}}, ["teff"])


def test_label_join_is_logged_and_a_poor_one_fails(tmp_path, caplog):
    from msa.data.labels import LabelError, LabelSource, load_labelled

    shard, transform, ids = _labelled_shard(tmp_path)
    catalogue_ids = [*ids[:30].tolist(), 5, 7, 9, 11, 13, 15, 17, 19, 21, 23]  # 30 in the store, 10 not
    (tmp_path / "labels.csv").write_text("source_id,teff\n" + "".join(f"{i},5000\n" for i in catalogue_ids))
    cfg = {"catalogue": str(tmp_path / "labels.csv"), "columns": {"teff": {"value": "teff"}}}
    caplog.set_level("INFO")
    stars = load_labelled([shard], transform, LabelSource(cfg, ["teff"]))
    assert len(stars) == 30
    assert "labels.csv: 30 of its 40 stars are in the 1 shard(s); 10 unmatched" in caplog.text
    with pytest.raises(LabelError, match=r"labels\.csv: only 30 of its 40 stars are in the store "
                                         r"\(below labels\.min_match_fraction = 0\.9\)"):
        load_labelled([shard], transform, LabelSource({**cfg, "min_match_fraction": 0.9}, ["teff"]))


# --- existing output folders: replaced only when the command wrote them (issue 27) ------------------

FOREIGN = {"notes.txt": "a file of the user's", "sub/deep.txt": "a file in a subfolder",
           "empty-sub/": "an empty subfolder", "theirs.parquet": "a Parquet file msa did not write"}


def _add_foreign(folder: Path, entry: str) -> Path:
    path = folder / entry.rstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if entry.endswith("/"):
        path.mkdir()
    elif entry.endswith(".parquet"):
        pd.DataFrame({"source_id": [1, 2]}).to_parquet(path)
    else:
        path.write_text("keep me")
    return path


def _catalog_argv(predictions, tmp: Path, out: Path) -> list[str]:
    from test_ensemble import FEATURES_CFG, LABELS

    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump({"features": FEATURES_CFG, "label_sets": {"spectro": LABELS},
                                   "catalog": {"max_rows_per_partition": 400, "highest_order": 6}}))
    return ["catalog", "--config", str(cfg), "--label-set", "spectro",
            "--inputs", *map(str, predictions["files"]), "--out-dir", str(out)]


def _refused_naming(argv: list[str], entry: str, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"msa {argv[0]}: error: "), err
    assert entry.rstrip("/") in err[0] and "msa did not write" in err[0], err[0]
    return err[0]


@pytest.mark.parametrize("entry", FOREIGN, ids=FOREIGN.get)
def test_catalog_out_dir_holding_other_files_is_refused(predictions, tmp_path, capsys, entry):
    """Before: the folder was replaced whole (the user's files deleted) and the summary beside it
    overwritten, rc 0. Now: refused before any work, naming the file; nothing changes."""
    out = tmp_path / "d"
    out.mkdir()
    foreign = _add_foreign(out, entry)
    summary = tmp_path / "spectro.summary.json"
    summary.write_text("the user's")
    argv = _catalog_argv(predictions, tmp_path, out)
    before = file_digests(tmp_path)
    _refused_naming(argv, entry, capsys)
    assert foreign.exists() and file_digests(tmp_path) == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_catalog_reruns_over_its_own_catalogue(predictions, tmp_path, capsys):
    """The workflow (and a user) rebuild into the same folder: the command's own output, with the
    timestamp file `snakemake --touch` leaves in a directory output, is replaced."""
    out = tmp_path / "results" / "catalog" / "spectro"
    argv = _catalog_argv(predictions, tmp_path, out)
    assert main(argv) == 0
    (out / ".snakemake_timestamp").touch()
    assert main(argv) == 0
    assert (out / "properties").exists() and not (out / ".snakemake_timestamp").exists()
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose
    assert main(argv[:-1] + [str(tmp_path / "empty")]) == 0
    _add_foreign(out, "notes.txt")  # the user's file added to the command's own catalogue: kept
    _refused_naming(argv, "notes.txt", capsys)
    assert (out / "notes.txt").exists() and (out / "properties").exists()


def _predict_shards_argv(s, tmp: Path, out: Path) -> list[str]:
    from test_predict import star_columns

    shard = tmp / "shard-0.h5"
    if not shard.exists():
        write_shard(shard, star_columns(150))
    return ["predict", "--config", s["config"], "--label-set", "spectro", "--members", *map(str, s["members"]),
            "--calibration", str(s["calibration"]), "--shards", str(shard), "--out-dir", str(out),
            "--device", "cpu"]


@pytest.mark.parametrize("entry", FOREIGN, ids=FOREIGN.get)
def test_predict_out_dir_holding_other_files_is_refused_and_its_own_is_replaced(predict_setup, tmp_path, capsys,
                                                                                entry):
    out = tmp_path / "predict" / "batch-0000"
    argv = _predict_shards_argv(predict_setup, tmp_path, out)
    assert main(argv) == 0
    (out / ".snakemake_timestamp").touch()
    assert main(argv) == 0  # a rerun over the command's own files
    assert sorted(p.name for p in out.iterdir()) == ["shard-0.parquet"]
    foreign = _add_foreign(out, entry)
    before = file_digests(tmp_path)
    _refused_naming(argv, entry, capsys)
    assert foreign.exists() and file_digests(tmp_path) == before


# --- msa reconstruct: a star it cannot reconstruct gets NaN, not zeros (issue 27) -------------------

@pytest.mark.parametrize("g_mag", ["1e300", "-1e300", "inf"])
def test_reconstruct_writes_nan_for_a_star_it_cannot_reconstruct(tmp_path, g_mag):
    """Before: G = 1e300 (inf in float32) undid the G normalisation with a factor 10^(0.4 G) = inf,
    and the star got 110 coefficients of 0; G = -1e300 gave inf. Now both are NaN."""
    import json

    import pyarrow.parquet as pq
    from test_ensemble import FEATURES_CFG, small_layout, write_member
    from test_predict import star_columns
    from test_reconstruct import spread_scaler

    from msa.data.layout import GROUP_ORDER

    layout = small_layout()
    member = write_member(tmp_path / "m.pt", layout, spread_scaler(layout))
    frame = pd.DataFrame(star_columns(150))
    frame["phot_g_mean_mag"] = frame["phot_g_mean_mag"].astype(object)
    frame.loc[3, "phot_g_mean_mag"] = g_mag
    table = tmp_path / "stars.csv"
    frame.to_csv(table, index=False)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"features": {**FEATURES_CFG, "reconstruct": list(GROUP_ORDER)}}))
    out = tmp_path / "rec.parquet"
    assert main(["reconstruct", "--config", str(config), "--table", str(table), "--out", str(out),
                 "--device", "cpu", "--models", str(member)]) == 0
    got = pq.read_table(out).to_pandas()
    rec = got[[c for c in got.columns if c.endswith("_reconstructed")]].to_numpy()
    assert np.isnan(rec[3]).all(), rec[3]
    g_known = np.isfinite(star_columns(150)["phot_g_mean_mag"])
    g_known[3] = False
    assert np.isfinite(rec[g_known]).all()  # every other star with a G is reconstructed


# --- finite absurd inputs: sentinels and absurd values are missing, absurd outputs NaN (issue 27) ----

def _predict_frame(s, tmp: Path, edits=(), name="p") -> pd.DataFrame:
    """``msa predict --table`` of the setup's stars with ``edits`` ((row, column, value), ...)."""
    frame = pd.read_csv(s["table"])
    for row, column, value in edits:
        frame.loc[row, column] = value
    table = tmp / f"{name}.csv"
    frame.to_csv(table, index=False)
    out = tmp / "out" / f"{name}.parquet"
    assert main(predict_argv(s, table, out)) == 0
    return pd.read_parquet(out)


QUANTILES = [f"{label}_{q}" for label in ("teff", "logg", "parallax") for q in ("q16", "q50", "q84")]


@pytest.mark.parametrize("column, value", [
    ("phot_rp_mean_mag", -999.0), ("phot_bp_mean_mag", -9999.0), ("phot_bp_mean_mag", 1e10),
    ("bp_3", 1e8), ("bp_3", 1e30), ("rp_1", -99999.0), ("parallax", 1e8), ("phot_g_mean_mag", 99.0)])
def test_predict_treats_a_sentinel_or_absurd_input_as_missing(predict_setup, tmp_path, caplog, column, value):
    """Before: K = -999 gave T_eff = -2556 K, BP = 1e10 -9.4e10 K, bp_3 = 1e8 320,869 K, with no flag, and
    bp_5 = 1e30 on one star failed the whole file ("non-finite predictions"). Now the value is missing:
    the star's prediction is exactly the one it gets with that value left empty, n_inputs_rejected
    counts it, the log says how many, and every other star is unchanged."""
    row = 7  # a star with XP and every band
    caplog.set_level("WARNING")
    absurd = _predict_frame(predict_setup, tmp_path, [(row, column, value)], "absurd")
    empty = _predict_frame(predict_setup, tmp_path, [(row, column, np.nan)], "empty")
    pd.testing.assert_frame_equal(absurd.drop(columns="n_inputs_rejected"), empty.drop(columns="n_inputs_rejected"))
    assert absurd["n_inputs_rejected"].tolist() == [int(i == row) for i in range(len(absurd))]
    assert not empty["n_inputs_rejected"].any() and not absurd["flag_out_of_range"].any()
    assert "1 implausible input value(s)" in caplog.text


def test_predict_writes_nan_and_flags_a_star_whose_prediction_is_absurd(predict_setup, tmp_path):
    """A model whose outputs stray (a T_eff scale of 5000 K) wrote T_eff < 0 unflagged, and one that
    overflows failed the whole file with "non-finite predictions"; now those stars are NaN with
    flag_out_of_range, the file is written, and no quantile outside a label's physical range is left."""
    from msa.data.plausible import outside_label_range

    q = np.array([[[5000, 5100, 5200]], [[np.inf, np.inf, np.inf]], [[-300, 50, 80]], [[np.nan] * 3]], float)
    assert outside_label_range(q, ["teff"], {"teff": "K"}).tolist() == [False, True, True, True]
    assert outside_label_range(q, ["teff"], {"teff": "kK"}).tolist() == [False, True, False, True]  # finite only
    from test_ensemble import small_layout, unit_scaler, write_member

    layout = small_layout()
    member = write_member(tmp_path / "member-0.pt", layout, unit_scaler(layout), seed=0,
                          label_centre=[4800.0, 2.5, 1.0], label_scale=[5e3, 1.0, 0.4])
    s = {**predict_setup, "members": [member]}
    import json

    from msa.nn.checkpoint import file_sha256
    calibration = json.loads(Path(s["calibration"]).read_text())
    calibration["member_sha256"] = [file_sha256(member)]
    (tmp_path / "c.json").write_text(json.dumps(calibration))
    frame = _predict_frame({**s, "calibration": tmp_path / "c.json"}, tmp_path)
    flagged = frame["flag_out_of_range"].to_numpy()
    assert 0 < flagged.sum() < len(frame) - frame["flag_too_few_inputs"].sum()
    assert frame.loc[flagged, QUANTILES].isna().all().all()
    ok = ~flagged & ~frame["flag_too_few_inputs"].to_numpy()
    assert np.isfinite(frame.loc[ok, QUANTILES].to_numpy()).all()
    assert frame.loc[ok, "teff_q16"].min() >= 1000 and frame.loc[ok, "teff_q84"].max() <= 200000


FEATURE_COLUMNS = ["bp_1", "bp_2", "bp_3", "rp_1", "rp_2", "rp_3", "phot_g_mean_mag", "phot_bp_mean_mag",
                   "phot_rp_mean_mag", "parallax"]
SENTINEL_VALUES = [-99.0, -999.0, -9999.0, -99999.0, 999.0, 9999.0, 99999.0]
extremes = st.one_of(st.sampled_from(SENTINEL_VALUES), st.sampled_from([1e8, -1e8, 1e10, 1e30, -1e30, 3e38]),
                     st.floats(allow_nan=False, allow_infinity=False, width=32))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, 149), st.sampled_from(FEATURE_COLUMNS), extremes),
                      min_size=1, max_size=12))
def test_predict_output_is_physical_or_nan_and_flagged_whatever_the_inputs(predict_setup, tmp_path, edits):
    """The class, not the case: random finite extremes and sentinels in any feature of any star.
    Every star's predictions are finite and inside each label's physical range, or NaN and flagged."""
    from msa.data.plausible import LABEL_RANGES

    frame = _predict_frame(predict_setup, tmp_path, edits, "random")
    q = frame[QUANTILES].to_numpy(dtype=np.float64)
    nan = np.isnan(q).all(axis=1)
    flagged = frame["flag_too_few_inputs"].to_numpy() | frame["flag_out_of_range"].to_numpy()
    assert (nan == flagged).all()
    assert np.isfinite(q[~nan]).all()
    for label in ("teff", "logg"):  # in K and dex, the config's label_units
        _, lo, hi = LABEL_RANGES[label]
        values = frame.loc[~nan, [f"{label}_q16", f"{label}_q50", f"{label}_q84"]].to_numpy()
        assert (values >= lo).all() and (values <= hi).all()
    edited_rows = sorted({row for row, _, _ in edits})
    untouched = np.setdiff1d(np.arange(len(frame)), edited_rows)
    assert not frame["n_inputs_rejected"].to_numpy()[untouched].any()


def test_ingest_stores_survey_sentinels_and_absurd_values_as_missing(tmp_path, caplog):
    """Before: survey -999 and 1e8 were stored as magnitudes (pretraining loss 4.6e7 instead of 0.8).
    Now they are missing in the store, counted in the shard's counts and the log."""
    ids = xp_ids()
    survey = tmp_path / "tmass.csv"
    values = np.linspace(10, 11, len(ids))
    values[2], values[5], values[6] = -999.0, 1e8, -9999.0
    pd.DataFrame({"source_id": ids, "j_m": values}).to_csv(survey, index=False)
    caplog.set_level("WARNING")
    assert main(ingest(tmp_path, survey=survey)) == 0
    with Shard(tmp_path / "out" / "s.h5") as shard:
        counts = yaml.safe_load(shard.attrs["counts"])
        stored = shard.read(["source_id", "j_m"])
    by_id = dict(zip(stored["source_id"].tolist(), stored["j_m"].tolist()))
    assert [np.isnan(by_id[i]) for i in ids] == [i in (2, 5, 6) for i in range(len(ids))]
    assert counts["survey_tmass_rejected"] == 3 and "j_m" in caplog.text


# --- a full disk: one line naming the file, nothing partial left (issue 27) ------------------------

def test_ingest_on_a_full_disk_says_so_naming_the_file_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Before: a full disk under h5py crashed ingest (rc 139, ~100 tracebacks). A tiny filesystem
    needs root, so the HDF5 writer is made to fail as it does there, after writing part of the file."""
    import errno

    import h5py

    real_create = h5py.Group.create_dataset
    calls = []

    def full(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:  # a partial file exists by now
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_create(self, *args, **kwargs)
    monkeypatch.setattr(h5py.Group, "create_dataset", full)
    argv = ingest(tmp_path)
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.fullmatch(r"msa ingest: error: DiskFullError: no space left on the device writing .*out/s\.h5: .*"
                        r"\(nothing was written\) \(run failed; --debug shows the traceback\)", err[0]), err[0]
    assert not (tmp_path / "out" / "s.h5").exists() and not list(tmp_path.rglob("*.tmp"))


def test_a_checkpoint_save_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    """Before: torch's "inline_container.cc ... unexpected pos" when finetune or pretrain saved on a
    full disk. Now the checkpoint is serialised in memory and written by Python: an error naming it."""
    import errno

    from msa.data.store import DiskFullError
    from msa.nn.checkpoint import save_checkpoint

    real_write = Path.write_bytes

    def full(self, data):
        real_write(self, bytes(data)[:10])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(DiskFullError, match=r"no space left on the device writing .*work/state\.pt"):
        save_checkpoint(tmp_path / "work" / "state.pt", {"step": 3})
    assert list((tmp_path / "work").iterdir()) == []


def test_a_json_file_as_members_is_refused_clearly(predict_setup, tmp_path, capsys):
    """Before: torch's message advising the unsafe weights_only=False. Now: not a checkpoint."""
    fake = tmp_path / "member.json"
    fake.write_text('{"member": 0}')
    capsys.readouterr()
    assert main(predict_argv({**predict_setup, "members": [fake]})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights_only" not in err[0], err
    assert re.search(r"member\.json is not a PyTorch checkpoint \(it starts with b'\{\"me'\); give the "
                     r"model\.pt files", err[0]), err[0]


def test_catalog_with_dec_above_90_names_the_file_and_the_star(predictions, tmp_path, capsys):
    """Before: ``ValueError: Latitude angle(s) must be within -90 deg <= angle <= 90 deg``, rc 1, no
    file or star named. Now rc 2 naming both, and nothing written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(predictions["files"][0])
    dec = table.column("dec").to_numpy().copy()
    dec[4] = 95.0
    bad = tmp_path / "bad-dec.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("dec"), table.schema.field("dec"), pa.array(dec)),
                   bad)
    star = table.column("source_id").to_numpy()[4]
    out = tmp_path / "catalog" / "spectro"
    argv = _catalog_argv({"files": [bad, predictions["files"][1]]}, tmp_path, out)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.search(rf"bad-dec\.parquet: 1 star\(s\) with dec outside \[-90, 90\] deg, e\.g\. source_id \[{star}\] "
                     r"\(dec \[95\.0\]\)", err[0]), err[0]
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))


# --- label catalogues: text and absurd values (issue 27) --------------------------------------------

def test_label_catalogue_with_text_in_a_label_column_names_file_column_and_row(tmp_path):
    """Before: ``ValueError: could not convert string to float: 'abc'``, no file or column named."""
    from msa.data.labels import LabelError, LabelSource

    (tmp_path / "labels.csv").write_text("source_id,teff\n11,5000\n13,abc\n15,4800\n")
    with pytest.raises(LabelError, match=r"labels\.csv: column 'teff' row 1 is not a number \('abc'\)"):
        LabelSource({"catalogue": str(tmp_path / "labels.csv"), "columns": {"teff": {"value": "teff"}}}, ["teff"])


def test_infinite_and_absurd_labels_are_dropped_with_a_count(tmp_path, caplog):
    """Before: inf or 1e300 in the train split ended fine-tuning with "lower the learning rate or
    enable grad_clip". Now they are missing labels, as NaN ones are, and the log says how many."""
    from msa.data.labels import LabelSource

    (tmp_path / "labels.csv").write_text("source_id,teff,logg\n11,5000,2.5\n13,inf,2.0\n15,1e300,-inf\n17,4800,-1e31\n")
    caplog.set_level("WARNING")
    source = LabelSource({"catalogue": str(tmp_path / "labels.csv"),
                          "columns": {"teff": {"value": "teff"}, "logg": {"value": "logg"}}}, ["teff", "logg"])
    y, _ = source.lookup(np.array([11, 13, 15, 17]))
    np.testing.assert_array_equal(np.isnan(y), [[False, False], [True, False], [True, True], [False, True]])
    np.testing.assert_array_equal(y[0], [5000, 2.5])
    assert "2 value(s) of column 'teff' are infinite or beyond 1e+30" in caplog.text and "[13, 15]" in caplog.text
    assert "2 value(s) of column 'logg'" in caplog.text


@pytest.mark.parametrize("bom_in", ["xp", "source", "both"])
def test_a_utf8_bom_in_the_xp_or_gaia_source_file_is_accepted(tmp_path, bom_in):
    """Before: the first column read as '\\ufeffsource_id', refused as a missing 'source_id' (the
    survey, label and --table readers already accepted a BOM). Now the shard is the same as without."""
    plain, with_bom = tmp_path / "plain", tmp_path / "bom"
    for folder in (plain, with_bom):
        folder.mkdir()
        xp = write_xp(folder / "XpContinuousMeanSpectrum_s.csv")
        source = write_source(folder / "GaiaSource_s.csv")
        if folder == with_bom:
            for path, role in ((xp, "xp"), (source, "source")):
                if bom_in in (role, "both"):
                    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        assert main(ingest(folder, xp=xp, source=source)) == 0
    with Shard(plain / "out" / "s.h5") as a, Shard(with_bom / "out" / "s.h5") as b:
        names = [c for c in a.columns]
        assert names == list(b.columns)
        got_a, got_b = a.read(names), b.read(names)
    for name in names:
        np.testing.assert_array_equal(got_a[name], got_b[name])


def test_a_symlinked_out_dir_is_written_through(predictions, tmp_path):
    """Before: the link was replaced by a real folder, so the catalogue landed beside the link (on
    the wrong filesystem) and the folder it pointed to kept the old one. Now it is written through
    the link, and a rebuild replaces the target's content, the link kept."""
    target = tmp_path / "big-disk" / "spectro"
    target.mkdir(parents=True)
    out = tmp_path / "here" / "spectro"
    out.parent.mkdir()
    out.symlink_to(target)
    argv = _catalog_argv(predictions, tmp_path, out)
    for _ in range(2):
        assert main(argv) == 0
        assert out.is_symlink() and out.resolve() == target.resolve()
        assert (target / "properties").exists() and (target / "dataset").is_dir()
    # the build's temporaries were beside the target, on its filesystem, and are gone
    assert sorted(p.name for p in target.parent.iterdir()) == ["spectro"]
