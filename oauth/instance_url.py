"""Which URLs may be used as a Dynamics 365 instance, and which Entra cloud signs in for each.

This is the SSRF guard: the app sends an access token to the instance URL, so only the hosts of
Dataverse environments in Microsoft's clouds are accepted, normalised to `https://<host>`.
Anything clever (userinfo, ports, paths, IP literals, non-ASCII or punycode lookalikes, trailing dots)
is refused rather than repaired.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.errors import FieldError

# One label: the organisation's unique name (letters, digits, hyphens; no leading/trailing hyphen).
_ORG = r"(?P<org>[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)"
# Commercial and GCC regions are crm, crm2 ... crm<NN> under dynamics.com (parsed generically, since
# Microsoft adds regions); the sovereign clouds have their own domains. `.api.` is the Web API form.
_CLOUDS: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(rf"^{_ORG}(?:\.api)?\.crm(?:[1-9][0-9]?)?\.dynamics\.com$"), "commercial", "login.microsoftonline.com"),
    (re.compile(rf"^{_ORG}(?:\.api)?\.crm\.microsoftdynamics\.us$"), "usgov-high", "login.microsoftonline.us"),
    (re.compile(rf"^{_ORG}(?:\.api)?\.crm\.appsplatform\.us$"), "usgov-dod", "login.microsoftonline.us"),
    (re.compile(rf"^{_ORG}(?:\.api)?\.crm\.dynamics\.cn$"), "china", "login.partner.microsoftonline.cn"),
)
# Microsoft's own service hosts under those domains are not customer environments.
_RESERVED_ORGS = frozenset({"globaldisco", "disco", "dev", "admin", "www", "login"})
_MAX_LENGTH = 300
_DEV_HOST_RE = re.compile(r"^[a-z0-9.-]+:[0-9]{1,5}$")


class InvalidInstanceUrl(FieldError):
    code = "invalid_instance_url"
    field = "instance_url"


@dataclass(frozen=True)
class Instance:
    url: str  # https://<host>[:port only for development hosts]
    host: str
    cloud: str  # commercial | usgov-high | usgov-dod | china | development
    login_host: str  # Entra authority host for this cloud

    @property
    def scope(self) -> str:
        return f"{self.url}/user_impersonation"


def parse_instance_url(raw: object, dev_hosts: tuple[str, ...] = ()) -> Instance:
    """The normalised instance for `raw`, or InvalidInstanceUrl saying what is wrong.

    `dev_hosts` (host:port, development only) are accepted as they are, e.g. a loopback simulator.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidInstanceUrl("instance_url is required: the https address of the Dynamics 365 environment, "
                                 "e.g. https://contoso.crm.dynamics.com")
    text = raw.strip(" ")  # spaces around a pasted address are harmless; other whitespace is not
    if len(text) > _MAX_LENGTH:
        raise InvalidInstanceUrl("instance_url is too long")
    if not text.isascii() or any(ord(c) < 0x21 or c == "\x7f" for c in text):
        raise InvalidInstanceUrl("instance_url must be plain ASCII without spaces or control characters "
                                 "(internationalised lookalike hosts are refused)")
    if any(c in text for c in "\\%@?#;"):
        raise InvalidInstanceUrl("instance_url must not contain credentials, a query, a fragment or escapes")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "https", text  # a bare host name is read as https
    if scheme.lower() != "https":
        raise InvalidInstanceUrl("instance_url must use https")
    authority, slash, path = rest.partition("/")
    if slash and path:
        raise InvalidInstanceUrl("instance_url must be the environment's address without a path, "
                                 "e.g. https://contoso.crm.dynamics.com")
    host = authority.lower()
    if host in dev_hosts:
        if not _DEV_HOST_RE.fullmatch(host):
            raise InvalidInstanceUrl("instance_url names a malformed development host")
        return Instance(url=f"https://{host}", host=host, cloud="development", login_host="")
    if ":" in host or host.startswith("["):
        raise InvalidInstanceUrl("instance_url must not name a port or an IP address")
    if re.fullmatch(r"[0-9.]+", host) or re.fullmatch(r"0x[0-9a-f.x]+", host):
        raise InvalidInstanceUrl("instance_url must not be an IP address")
    if host.endswith("."):
        raise InvalidInstanceUrl("instance_url must not end with a dot")
    if any(label.startswith("xn--") for label in host.split(".")):
        raise InvalidInstanceUrl("instance_url must not contain punycode (internationalised) labels")
    for pattern, cloud, login_host in _CLOUDS:
        m = pattern.fullmatch(host)
        if m and m.group("org") not in _RESERVED_ORGS:
            return Instance(url=f"https://{host}", host=host, cloud=cloud, login_host=login_host)
    raise InvalidInstanceUrl("instance_url is not a Dynamics 365 environment address (expected "
                             "https://<org>.crm[N].dynamics.com or a sovereign-cloud equivalent)")
