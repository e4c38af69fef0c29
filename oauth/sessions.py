"""Sign-ins in progress: the MSAL auth-code flow kept server-side by its `state`, single use, 10 minutes.

The flow holds the PKCE verifier and the nonce, so it never travels through the browser. Consuming a
session deletes its row with the row's ETag first: of two callbacks racing with the same state, only
one gets the flow.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, UpdateMode

from core.storage import delete_expired, iso
from oauth.errors import SessionInvalid

TABLE = "oauthsessions"
ROW = "flow"
LIFETIME = timedelta(minutes=10)


@dataclass
class OAuthSession:
    state: str
    account_id: str
    instance_url: str
    login_host: str
    plan: str
    initiated_by: str
    auto_sync: bool
    delete_policy: str
    return_url: str | None
    expires_at: str
    flow: dict[str, Any] = field(repr=False)  # holds the PKCE verifier: never logged


class SessionStore:
    def __init__(self, table: TableClient) -> None:
        self.table = table

    def create(self, session: OAuthSession) -> None:
        entity = {k: v for k, v in asdict(session).items() if v is not None and k != "flow"}
        entity.update(PartitionKey=session.state, RowKey=ROW, flow=json.dumps(session.flow))
        self.table.create_entity(entity)

    def consume(self, state: str, now: datetime | None = None) -> OAuthSession:
        """The session for `state`, removed so it cannot be used again; SessionInvalid if there is none."""
        if not state or len(state) > 200 or any(c in state for c in "/\\#?'\""):
            raise SessionInvalid("the sign-in link is not valid")
        try:
            entity = self.table.get_entity(state, ROW)
            if entity.get("used"):
                raise SessionInvalid("this sign-in was already completed")
            # Claim it with the ETag (a delete would not do: delete_entity ignores a missing row, so two
            # racing callbacks could both "delete" it), then remove it.
            self.table.update_entity({"PartitionKey": state, "RowKey": ROW, "used": True}, mode=UpdateMode.MERGE,
                                     etag=entity.metadata["etag"], match_condition=MatchConditions.IfNotModified)
        except ResourceNotFoundError as exc:
            raise SessionInvalid("this sign-in is unknown or was already completed") from exc
        except ResourceModifiedError as exc:
            raise SessionInvalid("this sign-in was already completed") from exc
        self.table.delete_entity(state, ROW)
        now = now or datetime.now(UTC)
        if entity["expires_at"] <= iso(now):
            raise SessionInvalid("this sign-in expired (it must be completed within 10 minutes)")
        return OAuthSession(
            state=state, account_id=entity["account_id"], instance_url=entity["instance_url"],
            login_host=entity.get("login_host", ""), plan=entity["plan"], initiated_by=entity["initiated_by"],
            auto_sync=bool(entity["auto_sync"]), delete_policy=entity["delete_policy"],
            return_url=entity.get("return_url"), expires_at=entity["expires_at"], flow=json.loads(entity["flow"]),
        )

    def purge_expired(self, now: datetime | None = None) -> int:
        """Delete the sessions whose time ran out; returns how many."""
        return delete_expired(self.table, iso(now or datetime.now(UTC)))


def expiry(now: datetime | None = None) -> str:
    return iso((now or datetime.now(UTC)) + LIFETIME)
