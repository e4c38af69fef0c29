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


class ConcurrencyError(AppError):
    """A row kept changing under us (or changed since it was read); the caller may retry the whole operation."""


class FieldError(AppError):
    """One field of some input is wrong: a webhook body, a contact from Wave, a connections API call.

    `field` names it, `message` says what is wrong (for people), `code` and `status` are what an HTTP
    answer carries (`{"error": {"code", "message", "field"}}`). Subclasses fix a field and code.
    """

    code = "invalid_request"
    field = ""
    status = 400

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None,
                 status: int | None = None) -> None:
        if field is not None:
            self.field = field
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        super().__init__(f"{self.field}: {message}" if self.field else message)
        self.message = message
