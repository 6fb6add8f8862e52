"""The one exception type debias_core raises for bad input."""


class DebiasError(ValueError):
    """Bad value given to debias_core; the message names the value and the fix."""
