"""The one exception type tensorlm raises for bad input.

The command line prints its message as a single line and exits non-zero, so every message names
the module, the shape or value at fault, and the valid choices.
"""


class TensorLMError(ValueError):
    """Bad input to tensorlm: a shape, a name, a file or an option that cannot be used."""
