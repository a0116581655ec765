"""Exceptions the project raises on bad user input, so callers catch one type per problem."""


class ModelLoadError(ValueError):
    """A model folder that cannot be loaded: missing, incomplete, or not matching its config.

    The message names the folder or file and says what was expected and what was found.
    """
