"""The Wave simulator (devstack.wave_sim) as one process with the admin page mounted on it.

    python -m devstack.wave_admin --port N --token T --secrets s1 --webhook-url URL --connections-api URL

The function key for the connections API comes from $WAVE_ADMIN_FUNCTION_KEY (not the command line,
where `ps` would show it). Besides the simulator's own control API it answers

    POST /_control/accounts/<acct>/populate  {"count": n, "team_members": [{"id", "email"}...], "seed": s}
    POST /_control/admins                    {"email": e, "accounts": [acct...] | null}

The first stores n varied contacts (no webhooks), each assigned round-robin to one of the team members
or to none, for the demo and the benchmarks; the second adds a Wave user who may sign in and administer
those accounts (null: all). `--admin-email` administers every account.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import unicodedata
from typing import Any

from devstack.wave_admin import AdminPage
from devstack.wave_sim import WaveSimulator, add_arguments, from_arguments, serve_until_interrupted

FIRST = ["Ada", "Grace", "Alan", "Katherine", "Linus", "Margaret", "Tim", "Barbara", "Dennis", "Frances",
         "José", "Zoë", "Søren", "Ngozi", "Mei", "Hiroshi", "Anaïs", "Olúwaseun"]
LAST = ["Lovelace", "Hopper", "Turing", "Johnson", "Torvalds", "Hamilton", "Berners-Lee", "Liskov", "Ritchie",
        "Allen", "O'Brien", "Müller", "Nguyen", "García-Márquez", "Kowalski", "Åberg"]
COMPANIES = ["Analytical Engines Ltd", "Contoso", "Fabrikam, Inc.", "Northwind Traders", "Tailspin Toys",
             "Wide World Importers", "A. Datum Corporation with a very long registered company name Ltd"]
TITLES = ["Mathematician", "Engineer", "Head of Sales", "CTO", None, "Buyer"]


def demo_contact(i: int, rng: random.Random) -> dict[str, Any]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    ascii_name = unicodedata.normalize("NFKD", f"{first}.{last}").encode("ascii", "ignore").decode()
    slug = ascii_name.lower().replace("'", "").replace(" ", "")
    return {
        "first_name": first,
        "last_name": last,
        "email": f"{slug}.{i}@example.com",
        "phone": f"+44 20 7946 {i % 10000:04d}" if i % 7 else None,
        "company": rng.choice(COMPANIES),
        "job_title": rng.choice(TITLES),
        "website": f"https://example.com/{slug}-{i}" if i % 3 == 0 else None,
        "note": f"Met at expo #{i % 50}" if i % 4 == 0 else None,
    }


def populate(sim: WaveSimulator, account_id: str, count: int, team_members: list[dict[str, Any] | None],
             seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    members = team_members or [None]
    ids = []
    for i in range(count):
        event = sim.create_contact(account_id, team_member=members[i % len(members)], **demo_contact(i, rng))
        ids.append(event["data"]["contact"]["id"])
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Wave simulator with the Dynamics 365 admin page")
    add_arguments(parser)
    parser.add_argument("--connections-api", required=True, help="the integration's base URL (the dev host)")
    parser.add_argument("--plan", default="teams", help="the plan Wave reports for every account")
    parser.add_argument("--admin-email", default="admin@wave.test")
    args = parser.parse_args(argv)

    sim = from_arguments(args)
    page = AdminPage(
        connections_api=args.connections_api,
        function_key=os.environ.get("WAVE_ADMIN_FUNCTION_KEY", ""),
        public_url=sim.url,
        admin_email=args.admin_email,
        plan_of=lambda _account: args.plan,
        contacts_total=lambda account: len(sim.contacts(account)),
    )
    sim.mount(page.handle)

    def _populate(req: Any) -> tuple[int, dict[str, str], bytes]:
        doc = req.json()
        ids = populate(sim, req.params["account"], int(doc.get("count", 0)), list(doc.get("team_members") or []),
                       int(doc.get("seed", 0)))
        return 200, {"Content-Type": "application/json"}, json.dumps({"count": len(ids)}).encode()

    def _admins(req: Any) -> tuple[int, dict[str, str], bytes]:
        doc = req.json()
        accounts = doc.get("accounts")
        page.add_admin(str(doc["email"]), None if accounts is None else {str(a) for a in accounts})
        return 200, {"Content-Type": "application/json"}, json.dumps({"email": doc["email"]}).encode()

    sim.add_route("POST", r"/_control/accounts/(?P<account>[^/]+)/populate", _populate)
    sim.add_route("POST", r"/_control/admins", _admins)
    return serve_until_interrupted(sim, "wave simulator with the admin page")


if __name__ == "__main__":
    sys.exit(main())
