"""The `msa` command line: every sub-command's --help shows its defaults, and every command that
runs a model takes the same --device option."""

from __future__ import annotations

import argparse

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
