"""The simulator's error: an HTTP status plus Dataverse's `{"error":{"code","message"}}` body."""

from __future__ import annotations

import uuid


class SimError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.during_penalty = False  # a 429 for a request sent while its user was in penalty

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def not_found(entity: str, record_id: str) -> SimError:
    return SimError(404, "0x80040217", f"{entity} With Id = {record_id} Does Not Exist")


def privilege_denied(user_id: str, privilege: str, entity: str) -> SimError:
    # The live message style (research/dataverse.md §4); OTC 2 is contact, 8 systemuser.
    otc = {"contact": 2, "systemuser": 8}.get(entity, 0)
    return SimError(
        403,
        "0x80040220",
        f"Principal user (Id={user_id}, type=8, roleCount=1) is missing {privilege} privilege "
        f"(Id={privilege_id(privilege)}) on OTC={otc} for entity '{entity}'.",
    )


def privilege_id(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, "dataverse-sim-privilege/" + name))
