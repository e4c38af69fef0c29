"""The app's exception hierarchy: every error we raise on purpose derives from AppError."""


class AppError(Exception):
    """Base of every error the app raises deliberately."""


class SettingsError(AppError):
    """A setting is missing or malformed. The message names the setting.

    `problem` never holds the setting's value, so it may be shown to anyone (GET /api/health); `got` is
    the offending value of a setting that is not a secret (a URL), added to the message for the operator.
    """

    def __init__(self, name: str, problem: str, *, got: str | None = None) -> None:
        super().__init__(f"setting {name}: {problem}" + (f", got {got!r}" if got is not None else ""))
        self.name = name
        self.problem = problem
