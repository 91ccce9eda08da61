"""The one exception type the retrieval tier raises for bad input or bad files."""


class RetrieverError(ValueError):
    """Bad input (shapes, values, parameters) or a missing, corrupt or truncated index or dataset file.

    The message is meant for the user as it stands: front ends print it without a traceback.
    """
