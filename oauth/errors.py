"""Errors of the connect flow and the token store.

Each carries what the caller needs to answer well (bad input is core/errors.py FieldError); a failed
sign-in knows the category and the reason a Wave admin can act on (shown in the connection status).
"""

from __future__ import annotations

from core.errors import AppError


class OAuthError(AppError):
    """Base of the connect flow's and token store's errors."""


class SessionInvalid(OAuthError):
    """The callback's `state` is unknown, already used or expired: nothing happens."""


class ConnectFailed(OAuthError):
    """Sign-in or the access check failed; `category` and `message` go to the status and the redirect."""

    def __init__(self, category: str, message: str) -> None:
        super().__init__(message)
        self.category = category
        self.message = message


class ConnectionGone(OAuthError):
    """There is no live connection to do this work for any more: callers drop their work."""

    def __init__(self, account_id: str, message: str) -> None:
        super().__init__(message)
        self.account_id = account_id
        self.message = message


class ReauthRequired(ConnectionGone):
    """Microsoft no longer accepts the connection's sign-in (invalid_grant); an admin must reconnect.

    The connection has been moved to `needs_reauth` already.
    """


class NotConnected(ConnectionGone):
    """The connection is not active (disconnected, pending, or a newer generation replaced it)."""


class TokenUnavailable(OAuthError):
    """Entra or Key Vault failed in a way that may pass (network, 5xx, throttling); retry later."""
