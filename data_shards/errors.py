"""The one error class of data_shards: bad input, described in one readable paragraph."""


class DataError(Exception):
    """Bad data or bad arguments. The message names the file, field or sample and what would be valid.

    The CLI prints it without a traceback and exits non-zero; library callers can catch it.
    """
