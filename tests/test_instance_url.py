"""Instance URL (SSRF guard) and return URL (open-redirect guard) rules, without I/O.

The HTTP-level proof that hostile instance URLs are refused before any network call is in
tests/test_connect.py; this file pins down the rules themselves.
"""

from __future__ import annotations

import pytest

from oauth.instance_url import InvalidInstanceUrl, parse_instance_url
from oauth.return_url import InvalidReturnUrl, validate_return_url, with_result

# Shared with tests/test_connect.py, which sends each of them through the connect endpoint.
HOSTILE_INSTANCE_URLS = [
    "http://contoso.crm.dynamics.com",  # not https
    "ftp://contoso.crm.dynamics.com",
    "https://contoso.crm.dynamics.com.evil.tld",  # suffix lookalike
    "https://contoso.crm.dynamics.com.",  # trailing dot
    "https://evil.tld/contoso.crm.dynamics.com",
    "https://contoso.crm.dynamics.com@evil.tld",  # userinfo trick
    "https://user:pass@contoso.crm.dynamics.com",
    "https://evil.tld#@contoso.crm.dynamics.com",
    "https://evil.tld\\@contoso.crm.dynamics.com",
    "https://contoso.crm.dynamics.com:444",  # port
    "https://contoso.crm.dynamics.com:443",
    "https://contoso.crm.dynamics.com/api/data/v9.2",  # path
    "https://contoso.crm.dynamics.com?x=1",
    "https://127.0.0.1",  # IP literals
    "https://169.254.169.254",
    "https://[::1]",
    "https://2130706433",
    "https://0x7f000001",
    "https://localhost",
    "https://contoso.crm.dynamics.com%2eevil.tld",
    "https://contoso.crm.dynamıcs.com",  # dotless i lookalike
    "https://contoso.crm.dynamics.cоm",  # Cyrillic o
    "https://xn--contso-5ya.crm.dynamics.com",  # punycode label
    "https://contoso.crm.dynamics.co",
    "https://contoso.dynamics.com",
    "https://contoso.crmx.dynamics.com",
    "https://contoso.crm123.dynamics.com",
    "https://a.b.crm.dynamics.com",  # extra label
    "https://-contoso.crm.dynamics.com",
    "https://contoso.crm.microsoftdynamics.de",  # the closed German cloud
    "https://globaldisco.crm.dynamics.com",  # a Microsoft service host, not an environment
    "https://contoso.crm.dynamics.com evil.tld",
    "https://contoso.crm.dynamics.com\t",
    "https://contoso.crm.dynamics.com/\r\nHost: evil.tld",
    "",
    "   ",
    "https://",
]


@pytest.mark.parametrize("url", HOSTILE_INSTANCE_URLS)
def test_hostile_instance_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidInstanceUrl) as info:
        parse_instance_url(url)
    assert info.value.code == "invalid_instance_url" and info.value.field == "instance_url"


@pytest.mark.parametrize("value", [None, 42, ["https://contoso.crm.dynamics.com"], {"url": "x"}])
def test_non_string_instance_url_is_refused(value: object) -> None:
    with pytest.raises(InvalidInstanceUrl):
        parse_instance_url(value)


@pytest.mark.parametrize(("raw", "url", "cloud", "login"), [
    ("https://contoso.crm.dynamics.com", "https://contoso.crm.dynamics.com", "commercial", "login.microsoftonline.com"),
    ("https://Contoso.CRM4.dynamics.com/", "https://contoso.crm4.dynamics.com", "commercial",
     "login.microsoftonline.com"),
    ("contoso.crm11.dynamics.com", "https://contoso.crm11.dynamics.com", "commercial", "login.microsoftonline.com"),
    ("https://contoso.api.crm.dynamics.com", "https://contoso.api.crm.dynamics.com", "commercial",
     "login.microsoftonline.com"),
    ("https://agency.crm9.dynamics.com", "https://agency.crm9.dynamics.com", "commercial",
     "login.microsoftonline.com"),
    ("https://agency.crm.microsoftdynamics.us", "https://agency.crm.microsoftdynamics.us", "usgov-high",
     "login.microsoftonline.us"),
    ("https://agency.api.crm.appsplatform.us", "https://agency.api.crm.appsplatform.us", "usgov-dod",
     "login.microsoftonline.us"),
    ("https://org-1.crm.dynamics.cn", "https://org-1.crm.dynamics.cn", "china", "login.partner.microsoftonline.cn"),
    ("  https://contoso.crm.dynamics.com  ", "https://contoso.crm.dynamics.com", "commercial",
     "login.microsoftonline.com"),
])
def test_dynamics_hosts_of_every_cloud_are_normalised(raw: str, url: str, cloud: str, login: str) -> None:
    instance = parse_instance_url(raw)
    assert (instance.url, instance.cloud, instance.login_host) == (url, cloud, login)
    assert instance.scope == f"{url}/user_impersonation"


def test_development_hosts_only_when_listed() -> None:
    with pytest.raises(InvalidInstanceUrl):
        parse_instance_url("https://127.0.0.1:8443")
    instance = parse_instance_url("https://127.0.0.1:8443", dev_hosts=("127.0.0.1:8443",))
    assert (instance.url, instance.cloud) == ("https://127.0.0.1:8443", "development")
    with pytest.raises(InvalidInstanceUrl):  # a listed host is still https-only and path-free
        parse_instance_url("http://127.0.0.1:8443", dev_hosts=("127.0.0.1:8443",))
    with pytest.raises(InvalidInstanceUrl):
        parse_instance_url("https://127.0.0.1:8443/x", dev_hosts=("127.0.0.1:8443",))


PREFIXES = ("https://app.wave.test/integrations/", "https://eu.wave.test:8443/admin")


@pytest.mark.parametrize("url", [
    "https://app.wave.test/integrations/",
    "https://app.wave.test/integrations/dynamics?tab=1#top",
    "https://APP.wave.test:443/integrations/x",
    "https://eu.wave.test:8443/admin",
    "https://eu.wave.test:8443/admin/page",
])
def test_return_urls_under_a_prefix_are_kept(url: str) -> None:
    assert validate_return_url(url, PREFIXES) == url


@pytest.mark.parametrize("url", [
    "https://app.wave.test.evil.com/integrations/",
    "https://app.wave.test@evil.com/integrations/",
    "https://evil.com@app.wave.test/integrations/",
    "http://app.wave.test/integrations/",
    "https://app.wave.test:444/integrations/",
    "https://app.wave.test/integrationsX/",
    "https://app.wave.test/other/",
    "https://app.wave.test/integrations/../admin",
    "https://app.wave.test/integrations/%2e%2e/admin",
    "https://eu.wave.test:8443/administrator",
    "https://eu.wave.test/admin",
    "//app.wave.test/integrations/",
    "/integrations/",
    "javascript:alert(1)//app.wave.test/integrations/",
    "https://app.wave.test\\@evil.com/integrations/",
    "https://app.wave.test/integrations/\r\nLocation: https://evil.com",
    42,
])
def test_return_urls_outside_the_prefixes_are_refused(url: object) -> None:
    with pytest.raises(InvalidReturnUrl):
        validate_return_url(url, PREFIXES)


def test_absent_return_url_is_none() -> None:
    assert validate_return_url(None, PREFIXES) is None and validate_return_url("", PREFIXES) is None


def test_result_parameters_are_appended_to_the_query() -> None:
    assert with_result("https://app.wave.test/i/?tab=1#x", dynamics="connected") == \
        "https://app.wave.test/i/?tab=1&dynamics=connected#x"
    assert with_result("https://app.wave.test/i?dynamics=old", dynamics="error", reason="consent") == \
        "https://app.wave.test/i?dynamics=error&reason=consent"
