"""The verdict `make demo` and the chaos test rest on: devstack.demo.compare (pure, no I/O).

It must call Dynamics equal to Wave only when every live contact has exactly one row with every mapped
column of its newest snapshot, the right owner, and no deleted contact has a row.
"""

from __future__ import annotations

import copy

from devstack.demo import compare, percentile
from sync.mapping import map_contact

ALICE = {"systemuserid": "aaaaaaaa-0000-0000-0000-000000000001", "internalemailaddress": "alice@contoso.test",
         "isdisabled": False}
CAROL = {"systemuserid": "cccccccc-0000-0000-0000-000000000003", "internalemailaddress": "carol@contoso.test",
         "isdisabled": True}
ADMIN = "99999999-0000-0000-0000-000000000009"
USERS = [ALICE, CAROL]


def contact(cid: str, **fields: object) -> dict:
    base = {"id": cid, "version": 1, "first_name": "Ada", "last_name": "Lovelace", "email": f"{cid}@example.com",
            "company": "Analytical Engines Ltd", "assigned_team_member": None}
    return {**base, **fields}


def row_for(c: dict, owner: str = ADMIN) -> dict:
    payload = map_contact(c, None).payload
    return {**payload, "contactid": f"row-{c['id']}", "_ownerid_value": owner}


def synced_world():
    wave = {
        "c_1": contact("c_1", assigned_team_member={"id": "tm_a", "email": "Alice@Contoso.TEST"}),
        "c_2": contact("c_2", company="X" * 60, note="n" * 10),
        "c_3": contact("c_3", assigned_team_member={"id": "tm_c", "email": "carol@contoso.test"}),
    }
    rows = [row_for(wave["c_1"], ALICE["systemuserid"]), row_for(wave["c_2"]), row_for(wave["c_3"])]
    return wave, {"c_9": 4}, rows


def test_a_faithful_copy_is_equal_and_counts_owners() -> None:
    wave, deleted, rows = synced_world()
    result = compare(wave, deleted, rows, USERS)
    assert result.equal, result.problems()
    assert (result.wave_contacts, result.wave_deleted, result.dynamics_rows) == (3, 1, 3)
    assert result.owners_assigned == 1  # alice, matched case-insensitively; carol is disabled: no owner expected


def test_every_kind_of_divergence_is_caught() -> None:
    wave, deleted, rows = synced_world()

    missing = compare(wave, deleted, rows[1:], USERS)
    assert not missing.equal and missing.missing == ["c_1"]

    dup = compare(wave, deleted, [*rows, {**rows[2], "contactid": "another"}], USERS)
    assert not dup.equal and dup.duplicates == 1

    resurrected = compare(wave, deleted, [*rows, row_for(contact("c_9"))], USERS)
    assert not resurrected.equal and resurrected.resurrected == ["c_9"]

    unknown = compare(wave, deleted, [*rows, row_for(contact("c_77"))], USERS)
    assert not unknown.equal and unknown.unknown == ["wavecnct_c_77"]

    stale = copy.deepcopy(rows)
    stale[1]["company"] = "Y" * 49  # an older snapshot's value
    mismatch = compare(wave, deleted, stale, USERS)
    assert not mismatch.equal and mismatch.mismatched[0].startswith("c_2: company")

    cleared = copy.deepcopy(rows)
    cleared[1]["description"] = None  # Wave has a note; Dynamics lost it
    assert compare(wave, deleted, cleared, USERS).mismatched[0].startswith("c_2: description")


def test_owners_must_follow_the_team_member_and_never_a_disabled_user() -> None:
    wave, deleted, rows = synced_world()
    wrong = copy.deepcopy(rows)
    wrong[0]["_ownerid_value"] = ADMIN  # alice's contact left with the connecting admin
    assert compare(wave, deleted, wrong, USERS).owner_errors

    disabled = copy.deepcopy(rows)
    disabled[2]["_ownerid_value"] = CAROL["systemuserid"]
    assert compare(wave, deleted, disabled, USERS).owner_errors


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
