"""User-facing error types, in a module light enough that the CLI reports bad input before torch loads."""


class ConfigError(ValueError):
    """Bad user input; the message is one line naming the key, file or value."""


class DataError(ValueError):
    """A dataset is missing or unreadable; the message says which files are expected where."""
