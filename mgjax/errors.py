"""The one exception type mgjax raises for bad input (files, keys, shapes, configs)."""


class MGJaxError(ValueError):
    """Bad user input: the message names the file, key or field and says what to do."""
