"""The one distinction the ``msa`` command needs from every stage: bad input or a failed run.

An :class:`InputError` is a problem with what the user gave (a file, a column, a config key): the
command prints its one-line message and exits 2. Any other exception is a failed run (exit 1).
Each module's own error class derives from it, so ``except ArchiveFormatError`` keeps working.

This module is a leaf: it imports nothing.
"""


class InputError(Exception):
    """Bad input; the message names the file or key and says what would fix it."""
