"""User-facing error types, in a module light enough that the CLI reports bad input before torch loads."""


class ConfigError(ValueError):
    """Bad user input; the message is one line naming the key, file or value."""


class DataError(ValueError):
    """A dataset is missing or unreadable; the message says which files are expected where."""


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT or SIGTERM (``signum``); run folders mark it "interrupted"."""

    def __init__(self, message: str = "interrupted", *, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum


class RunFailed(Exception):
    """The run could not go on (e.g. too many clients failed a round); the message is one line."""
