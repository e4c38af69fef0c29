"""Wave contact -> Dataverse contact payload (the field table at the top of README.md). Pure functions.

Public interface:
    map_contact(contact: dict, owner_id: str | None) -> MappedContact(payload, warnings, content_hash)
    external_id(wave_id: str) -> "wavecnct_<id>"
    contact_id(account_id: str, wave_id: str) -> str   (uuid5, the deterministic contactid for new rows)
    owner_email(contact: dict) -> str | None           (assigned_team_member.email, for the caller to resolve)
    COLUMNS                                           the mapping table with each column's limit

Rules:
- A Wave contact is a full snapshot: a field that is absent, null or empty maps to null, which clears the
  column in Dataverse (every mapped column is always present in the payload).
- `company` is cut to 49 characters (the seed's cap); any other value longer than its column is cut to the
  column's MaxLength. Every cut is reported in `warnings`, never raised.
- Lengths are counted in UTF-16 code units, as .NET's string.Length (which Dataverse's MaxLength check
  uses) does. For text without astral characters this equals the number of characters; for emoji and
  other astral characters it is stricter, so a value that fits here fits in Dataverse under either count.
  A cut never splits a surrogate pair and never leaves a base character without its combining marks,
  variation selectors, emoji modifiers, zero-width-joiner sequence or flag partner: the whole cluster is
  dropped.
- The owner is resolved by the caller (systemuser lookup by email); `owner_id` None means "set no owner",
  and the payload then has no `ownerid@odata.bind` at all (Dataverse keeps the current owner).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
import uuid
from dataclasses import dataclass
from typing import Any

from core.errors import FieldError

EXTERNAL_ID_PREFIX = "wavecnct_"
WAVE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,41}")
# Fixed forever: changing it would give every existing contact a new deterministic id.
CONTACT_NAMESPACE = uuid.UUID("6f0a4d1e-8c1b-5e4f-9a57-3c2d7b9e0a11")
# Part of the content hash, so a change of the mapping rules makes every contact count as changed.
MAPPING_VERSION = "1"


@dataclass(frozen=True)
class Column:
    wave_field: str
    column: str  # Dataverse logical name
    max_length: int  # UTF-16 code units


COLUMNS: tuple[Column, ...] = (
    Column("first_name", "firstname", 50),
    Column("last_name", "lastname", 50),
    Column("email", "emailaddress1", 100),
    Column("phone", "mobilephone", 50),
    Column("company", "company", 49),  # the column holds 50; the seed promises 49
    Column("job_title", "jobtitle", 100),
    Column("website", "websiteurl", 200),
    Column("note", "description", 2000),
)
EXTERNAL_ID_COLUMN = "externaluseridentifier"
OWNER_BIND = "ownerid@odata.bind"


@dataclass(frozen=True)
class MappedContact:
    payload: dict[str, Any]
    warnings: list[str]
    content_hash: str


def external_id(wave_id: str) -> str:
    if not isinstance(wave_id, str) or not WAVE_ID_RE.fullmatch(wave_id):
        raise FieldError("must match [A-Za-z0-9_-]{1,41}", field="id")
    return EXTERNAL_ID_PREFIX + wave_id


def contact_id(account_id: str, wave_id: str) -> str:
    """The contactid a new row gets: the same for every worker, so racing creates converge on one row."""
    return str(uuid.uuid5(CONTACT_NAMESPACE, f"{account_id}/{wave_id}"))


def utf16_len(text: str) -> int:
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def _extends_cluster(ch: str) -> bool:
    """True when `ch` belongs to the character before it (so a cut must not fall just before it)."""
    code = ord(ch)
    return (
        unicodedata.category(ch) in ("Mn", "Me", "Mc")
        or code == 0x200D  # zero-width joiner
        or 0xFE00 <= code <= 0xFE0F  # variation selectors
        or 0xE0100 <= code <= 0xE01EF
        or 0x1F3FB <= code <= 0x1F3FF  # emoji skin-tone modifiers
        or 0xE0020 <= code <= 0xE007F  # tag characters (flag sequences)
    )


def cut(text: str, max_units: int) -> str:
    """The longest prefix of whole clusters whose UTF-16 length is at most `max_units`."""
    if utf16_len(text) <= max_units:
        return text
    end, units = 0, 0
    for ch in text:
        size = 2 if ord(ch) > 0xFFFF else 1
        if units + size > max_units:
            break
        units += size
        end += 1
    while True:
        # Back off while the cut would separate a cluster: the first dropped char extends the last kept
        # one, or the last kept char is a joiner waiting for its partner.
        while end > 0 and (_extends_cluster(text[end]) or text[end - 1] == "\u200d"):
            end -= 1
        # Flags are pairs of regional indicators: never keep an odd one at the end.
        run = 0
        while run < end and _is_regional_indicator(text[end - 1 - run]):
            run += 1
        if not (run % 2 == 1 and end < len(text) and _is_regional_indicator(text[end])):
            return text[:end]
        # Dropping that indicator may leave a joiner whose partner it was: check the new end again.
        end -= 1


def _is_regional_indicator(ch: str) -> bool:
    return 0x1F1E6 <= ord(ch) <= 0x1F1FF


def _text(contact: dict[str, Any], field: str) -> str | None:
    value = contact.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise FieldError("must be a string or null", field=field)
    text = str(value)
    return text if text.strip() else None


def owner_email(contact: dict[str, Any]) -> str | None:
    """The assigned team member's email (what the caller resolves to a systemuserid), or None."""
    member = contact.get("assigned_team_member")
    if not isinstance(member, dict):
        return None
    email = member.get("email")
    return email.strip() if isinstance(email, str) and email.strip() else None


def content_hash(payload: dict[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(f"{MAPPING_VERSION}\n{canonical}".encode()).hexdigest()


def map_contact(contact: dict[str, Any], owner_id: str | None) -> MappedContact:
    """Map one Wave contact snapshot. `owner_id` is the owning systemuserid, or None for no owner."""
    if not isinstance(contact, dict):
        raise FieldError("must be an object", field="contact")
    payload: dict[str, Any] = {}
    warnings: list[str] = []
    for col in COLUMNS:
        value = _text(contact, col.wave_field)
        if value is not None and utf16_len(value) > col.max_length:
            short = cut(value, col.max_length)
            warnings.append(
                f"{col.wave_field} was {utf16_len(value)} characters long; cut to {utf16_len(short)} "
                f"to fit {col.column} (max {col.max_length})"
            )
            value = short or None
        payload[col.column] = value
    payload[EXTERNAL_ID_COLUMN] = external_id(contact.get("id"))  # type: ignore[arg-type]
    if owner_id:
        try:
            owner = str(uuid.UUID(owner_id))
        except (ValueError, TypeError, AttributeError):
            raise FieldError("must be a systemuserid (GUID)", field="owner_id") from None
        payload[OWNER_BIND] = f"/systemusers({owner})"
    return MappedContact(payload, warnings, content_hash(payload))
