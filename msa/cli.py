"""The ``msa`` command: one sub-command per pipeline stage.

Each stage module exposes ``add_arguments(parser)`` and ``run(args) -> int``; they are imported
only when their sub-command runs, so ``msa --help`` stays fast.

Every command takes the same common options, before or after its name (``msa -v fit-scaler`` or
``msa fit-scaler -v``): ``-v/--verbose``, ``--debug``, ``--no-progress``; and reads any argument
from a file as ``@FILE`` (one argument a line). ``--config`` is the pipeline config: required by
every command that reads settings, optional only for ``ingest`` (which also runs on the files named
on its command line, with the schema's defaults); ``synthesize`` reads no config and takes none.

Errors: one line ``msa <command>: error: <message>`` on stderr, no traceback (``--debug`` shows
it). Exit 2 for bad input (:class:`msa.errors.InputError`, a missing file; argparse uses 2 too),
1 for a run that failed for another reason.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from msa import __version__
from msa.errors import InputError
from msa.progress import NO_PROGRESS_ENV

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1

# sub-command -> (module, one-line help)
COMMANDS = {
    "ingest": ("msa.data.ingest", "Gaia Archive XP (+ gaia_source, survey) files -> one HDF5 shard"),
    "synthesize": ("msa.data.synthetic", "write a synthetic sky in Gaia Archive formats, with known truth"),
    "fit-scaler": ("msa.data.fit_scaler", "fit the robust feature scaler on a seeded sample of shards"),
    "pretrain": ("msa.pretrain.stage", "masked-autoencoder pretraining over the shard store (one segment)"),
    "probe": ("msa.pretrain.probe", "linear probe of the pretrained latent per label, beside raw inputs and a random encoder"),
    "finetune": ("msa.finetune.stage", "fine-tune one ensemble member on one label set"),
    "calibrate": ("msa.calibration.calibrate", "split-conformal calibration of a label set's ensemble"),
    "evaluate": ("msa.evaluation.evaluate", "metrics and figures of a label set on the test split"),
    "front-page": ("msa.evaluation.front_page", "the results table that leads the Snakemake report"),
    "predict": ("msa.catalogue.predict", "predict a shard or table into a Parquet file, or shards into a folder"),
    "catalog": ("msa.catalogue.catalog", "gather prediction files into a HATS catalogue (lsdb.read_hats opens it)"),
    "train-reconstruction": ("msa.spectra.train",
                             "train the pretrained autoencoder further on XP inferred from photometry (flux loss)"),
    "reconstruct": ("msa.spectra.reconstruct", "the autoencoder's XP coefficients of a shard or table, in Archive units"),
    "evaluate-reconstruction": ("msa.spectra.evaluate",
                                "XP reconstruction with XP hidden vs a photometry kNN, on held-out stars"),
    "embed": ("msa.spectra.embed", "each star's encoder representation (embeddings) into Parquet"),
}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default; not for required options and flags, whose
    "default: None/False" would say nothing, nor where the help text already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        says_nothing = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.required or says_nothing or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


FROM_FILE_EPILOG = ("Any argument can be read from a file: @FILE stands for the file's lines, one "
                    "argument a line (the workflow passes its shard list as --shards @shards.txt).")


def common_options(after_command: bool) -> argparse.ArgumentParser:
    """The options of every command. After a command's name they default to SUPPRESS, so that
    leaving them out there keeps what was given before the name (`msa -v ingest ...`)."""
    default = argparse.SUPPRESS if after_command else False
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    options.add_argument("--debug", action="store_true", default=default,
                         help="show the traceback of an error")
    options.add_argument("--no-progress", action="store_true", default=default,
                         help=f"no progress bars or progress log lines (as {NO_PROGRESS_ENV}=1)")
    return options


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msa", description="Masked Stellar Autoencoder pipeline",
                                     fromfile_prefix_chars="@", parents=[common_options(False)],
                                     epilog=FROM_FILE_EPILOG)
    parser.add_argument("--version", action="version", version=f"msa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=FROM_FILE_EPILOG,
                           formatter_class=DefaultsHelpFormatter, parents=[common_options(True)])
        if name == load:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(load=command).parse_args(argv)
    if args.no_progress:
        os.environ[NO_PROGRESS_ENV] = "1"  # read by msa.progress here and in the processes started
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args) or 0)
    except Exception as err:
        if args.debug:
            raise
        bad_input = isinstance(err, (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError))
        message = " ".join(str(err).split()) or type(err).__name__  # one line, even for multi-line messages
        if not bad_input:
            message = f"{type(err).__name__}: {message} (run failed; --debug shows the traceback)"
        print(f"msa {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT if bad_input else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
