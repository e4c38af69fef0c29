"""The one form team member emails are compared in, by the owner cache and the Dataverse user lookup."""

from __future__ import annotations

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def normalise_email(email: str | None) -> str | None:
    """The form owner emails are matched and cached under: trimmed, ASCII letters lower-cased.

    Only A-Z are folded, as DNS does for domains (https://www.rfc-editor.org/rfc/rfc4343) and as mail
    systems do for local parts in practice (https://www.rfc-editor.org/rfc/rfc5321#section-2.4).
    `str.lower()` would also fold characters such as the Kelvin sign U+212A into `k`, so a team member's
    email spelt with that sign would take the Dynamics user whose email has a `k` instead.
    """
    if not email or not email.strip():
        return None
    return email.strip().translate(_ASCII_LOWER)
