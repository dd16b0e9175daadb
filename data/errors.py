"""The one exception the data pipeline raises for bad input."""


class DataError(ValueError):
    """Bad data input or configuration.

    The message is one line naming the problem and the fix, using the public
    config names (data.path, data.vocab_size, ...), so the trainer can print it
    as-is instead of a traceback.
    """
