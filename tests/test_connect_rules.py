"""Pure rules of the connect flow: Microsoft's redirect errors as reasons, required privileges, request
validation and secret names."""

from __future__ import annotations

import pytest

from core.errors import FieldError
from core.settings import load_settings
from oauth.connect import REQUIRED_PRIVILEGES, microsoft_error, missing_privileges, parse_connect_request
from oauth.token_store import first_line, secret_name

ENV = {
    "APP_ENV": "production", "AzureWebJobsStorage": "UseDevelopmentStorage=true",
    "KEY_VAULT_URL": "https://kv.vault.azure.net", "DYNAMICS_CLIENT_ID": "c", "DYNAMICS_CLIENT_SECRET": "s",
    "OAUTH_REDIRECT_URI": "https://fn.example/api/oauth/callback", "WAVE_WEBHOOK_SECRETS": "w",
    "WAVE_API_BASE_URL": "https://api.wave.test", "WAVE_API_TOKEN": "t",
    "WAVE_RETURN_URL_PREFIXES": "https://app.wave.test/integrations/",
    "DEV_ALLOWED_INSTANCE_HOSTS": "127.0.0.1:8443",
}


@pytest.mark.parametrize(("error", "description", "category", "words"), [
    ("access_denied", "AADSTS65004: User declined to consent to access the app.\r\nTrace ID: x", "consent",
     "declined"),
    ("access_denied", None, "consent", "cancelled"),
    ("consent_required", "AADSTS65001: The user or administrator has not consented.", "consent",
     "administrator to approve"),
    ("invalid_request", "AADSTS90094: Admin consent is required.", "consent", "admin consent"),
    ("invalid_client", "AADSTS700016: Application not found in the directory.", "auth", "AADSTS700016"),
    ("server_error", "", "auth", "server_error"),
    # the description is forgeable text from the redirect's query: only an AADSTS code survives
    ("access_denied", "<img src=x onerror=alert(1)> AADSTS65004", "consent", "(AADSTS65004)"),
    ("Not A Code<script>", "whatever", "auth", "unrecognised_error"),
])
def test_microsoft_errors_become_readable_reasons(error, description, category, words):
    failed = microsoft_error(error, description)
    assert failed.category == category and words in failed.message and "Trace ID" not in failed.message
    assert "<" not in failed.message and "whatever" not in failed.message and "directory" not in failed.message


def test_missing_privileges_are_named_in_order():
    assert missing_privileges(set(REQUIRED_PRIVILEGES)) == []
    assert missing_privileges({"prvcreatecontact", "prvReadContact"}) == \
        ["prvWriteContact", "prvAssignContact", "prvReadUser"]


def test_development_hosts_are_refused_in_production():
    settings = load_settings(ENV)
    body = {"instance_url": "https://127.0.0.1:8443", "plan": "pro", "initiated_by": "u",
            "return_url": "https://app.wave.test/integrations/x"}
    with pytest.raises(FieldError) as info:
        parse_connect_request("acct_1", body, settings)
    assert info.value.field == "instance_url"
    dev = load_settings({**ENV, "APP_ENV": "development"})
    assert parse_connect_request("acct_1", body, dev).instance.url == "https://127.0.0.1:8443"


def test_plan_is_checked_before_the_instance_and_defaults_apply():
    settings = load_settings(ENV)
    with pytest.raises(FieldError) as info:
        parse_connect_request("acct_1", {"plan": "free", "instance_url": "x"}, settings)
    assert (info.value.status, info.value.code) == (403, "plan_not_eligible")
    back = "https://app.wave.test/integrations/dynamics365/acct_1"
    req = parse_connect_request("acct_1", {"plan": " Enterprise ", "instance_url": "contoso.crm4.dynamics.com",
                                           "initiated_by": "u", "return_url": back}, settings)
    assert (req.plan, req.auto_sync, req.delete_policy, req.return_url) == ("enterprise", False, "delete", back)
    with pytest.raises(FieldError) as missing:  # only Wave's page can confirm the sign-in
        parse_connect_request("acct_1", {"plan": "pro", "instance_url": "contoso.crm4.dynamics.com",
                                         "initiated_by": "u"}, settings)
    assert (missing.value.code, missing.value.field) == ("invalid_return_url", "return_url")
    assert req.instance.url == "https://contoso.crm4.dynamics.com"


def test_secret_names_fit_key_vault_rules():
    name = secret_name("acct_" + "x" * 59, "0" * 32)
    assert len(name) <= 127 and set(name) <= set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-")
    assert secret_name("a_b", "g1") != secret_name("a_b", "g2")


def test_first_line_drops_trace_lines():
    assert first_line("AADSTS700082: expired.\r\nTrace ID: 1\r\nTimestamp: 2") == "AADSTS700082: expired."
