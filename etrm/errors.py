"""One exception type for everything a user can get wrong.

Library code raises `EtrmError` with a message that names the file, task,
option or key at fault; `etrm.cli.main` prints it without a traceback and
exits with status 2.
"""


class EtrmError(Exception):
    """A user-facing error: bad input, bad option, missing or corrupt file."""
