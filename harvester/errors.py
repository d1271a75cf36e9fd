"""The one exception type the CLI turns into a clear one-line error."""


class HarvestError(Exception):
    """A user-facing error: bad input, an incompatible store, an unsupported model.

    The CLI prints ``lsn: error: <message>`` and exits non-zero, without a traceback.
    """
