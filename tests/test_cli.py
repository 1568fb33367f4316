"""The `msa` command line: every sub-command's --help shows its defaults, and every command that
runs a model takes the same --device option."""

from __future__ import annotations

import argparse
import os

import pytest

from msa.cli import COMMANDS, DefaultsHelpFormatter, build_parser, main
from msa.nn.training import DEVICE_HELP, device_choice

MODEL_COMMANDS = ["pretrain", "finetune", "predict", "reconstruct", "embed", "calibrate", "evaluate",
                  "evaluate-reconstruction"]


def command_parser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(load=name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def shown_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_shows_every_option_default(name):
    parser = command_parser(name)
    assert parser.formatter_class is DefaultsHelpFormatter
    for action in parser._actions:
        if action.required or action.default in (None, argparse.SUPPRESS) or action.default is False:
            continue
        assert "default" in shown_help(parser, action), f"msa {name} {action.option_strings}: no default shown"


def test_help_text_of_a_command_names_the_device_default(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "(default: auto)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_every_model_command_takes_the_same_device_option(name):
    device = option(command_parser(name), "--device")
    assert device is not None, f"msa {name} has no --device"
    assert (device.default, device.type, device.help) == ("auto", device_choice, DEVICE_HELP)


@pytest.mark.parametrize("text", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_choices_are_accepted(text):
    assert device_choice(text) == text


def test_an_unknown_device_is_rejected_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["predict", "--config", "c.yaml", "--label-set", "s", "--members", "m.pt",
              "--calibration", "c.json", "--shard", "s.h5", "--out", "o.parquet", "--device", "gpu"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "'gpu' is not a device" in err and "cuda:N" in err


# --- options every command shares ----------------------------------------------------------------

SYNTHESIZE = ["synthesize", "--out", "sky", "--n-stars", "10"]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_takes_the_common_options_after_its_name(name):
    parser = command_parser(name)
    for flag in ("-v", "--verbose", "--debug", "--no-progress"):
        assert option(parser, flag) is not None, f"msa {name} has no {flag}"
    assert "@FILE" in parser.epilog


@pytest.mark.parametrize("where", ["before", "after"])
def test_common_options_count_before_or_after_the_command_name(where):
    common = ["-v", "--debug", "--no-progress"]
    argv = common + SYNTHESIZE if where == "before" else SYNTHESIZE + common
    args = build_parser(load="synthesize").parse_args(argv)
    assert (args.verbose, args.debug, args.no_progress) == (True, True, True)
    plain = build_parser(load="synthesize").parse_args(SYNTHESIZE)
    assert (plain.verbose, plain.debug, plain.no_progress) == (False, False, False)


def test_any_argument_after_the_command_name_reads_from_a_file(tmp_path):
    (tmp_path / "args.txt").write_text("--n-stars\n25\n--seed\n3\n")
    args = build_parser(load="synthesize").parse_args(["synthesize", "--out", "sky", f"@{tmp_path / 'args.txt'}"])
    assert (args.n_stars, args.seed) == (25, 3)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_config_is_required_where_settings_are_read_and_absent_where_none_are(name):
    config = option(command_parser(name), "--config")
    if name == "synthesize":
        assert config is None, "synthesize reads no config: no --config to show"
        return
    assert config is not None and config.help.startswith("pipeline config"), f"msa {name}"
    assert config.required == (name != "ingest"), f"msa {name}: only ingest runs without a config"


def test_no_progress_turns_off_every_progress_tracker(monkeypatch, tmp_path, capsys):
    from msa.progress import NO_PROGRESS_ENV, progress

    monkeypatch.setenv(NO_PROGRESS_ENV, "")  # restored after the test, whatever main() sets
    monkeypatch.delenv(NO_PROGRESS_ENV)
    assert progress(range(3), desc="on").enabled
    assert main([*SYNTHESIZE[:2], str(tmp_path / "sky"), *SYNTHESIZE[3:], "--n-shards", "2", "--no-progress"]) == 0
    assert os.environ.get(NO_PROGRESS_ENV) == "1"
    assert not progress(range(3), desc="off").enabled
