"""The app's exception hierarchy: every error we raise on purpose derives from AppError."""


class AppError(Exception):
    """Base of every error the app raises deliberately."""


class SettingsError(AppError):
    """A setting is missing or malformed. The message names the setting."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"setting {name}: {problem}")
        self.name = name
        self.problem = problem
