"""Settings are read once, validated, and a bad one is named in a one-line error."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from core.errors import SettingsError
from core.settings import APP_SETTINGS, DEV_SETTINGS, load_settings
from tests.fixtures.stack import BASE_ENV

ROOT = Path(__file__).resolve().parent.parent
GOOD = {**BASE_ENV, "AzureWebJobsStorage": "UseDevelopmentStorage=true"}


def test_a_complete_environment_loads_with_secrets_hidden_from_repr():
    settings = load_settings(GOOD)
    assert settings.wave_webhook_secrets == ("whsec_test_current_0123456789", "whsec_test_previous_0123456789")
    assert settings.is_development
    text = repr(settings)
    for secret in ("test-client-secret-value", "whsec_test_current", "wave-api-token-for-tests"):
        assert secret not in text


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("KEY_VAULT_URL", "", "is missing"),
        ("KEY_VAULT_URL", "http://vault.example", "must be an https URL"),
        ("DYNAMICS_CLIENT_SECRET", "  ", "is missing"),
        ("OAUTH_REDIRECT_URI", "ftp://x/callback", "must be an https URL (or http on localhost)"),
        ("WAVE_WEBHOOK_SECRETS", "a,,b", "empty entry"),
        ("WAVE_RETURN_URL_PREFIXES", "javascript:alert(1)", "must be an https URL"),
        ("APP_ENV", "staging", "must be 'production' or 'development'"),
        ("AzureWebJobsStorage", "not-a-connection-string", "not a storage connection string"),
    ],
)
def test_a_bad_setting_is_named(name, value, problem):
    with pytest.raises(SettingsError) as err:
        load_settings({**GOOD, name: value})
    assert err.value.name == name
    assert problem in str(err.value)
    assert str(err.value).startswith(f"setting {name}: ")
    assert not value.strip() or value not in err.value.problem  # the part GET /api/health shows


def test_identity_based_storage_needs_both_service_uris():
    env = {k: v for k, v in GOOD.items() if k != "AzureWebJobsStorage"}
    env["AzureWebJobsStorage__queueServiceUri"] = "https://st.queue.core.windows.net"
    with pytest.raises(SettingsError) as err:
        load_settings(env)
    assert err.value.name == "AzureWebJobsStorage__tableServiceUri"
    env["AzureWebJobsStorage__tableServiceUri"] = "https://st.table.core.windows.net"
    env["AzureWebJobsStorage__clientId"] = "abc"
    storage = load_settings(env).storage
    assert storage.connection_string is None and storage.managed_identity_client_id == "abc"


def test_dev_overrides_only_count_in_development(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    overrides = {"DEV_ALLOWED_INSTANCE_HOSTS": "127.0.0.1:8443", "DEV_CA_BUNDLE": str(ca),
                 "DEV_ENTRA_AUTHORITY": "https://localhost:1234/tenant/v2.0"}
    dev = load_settings({**GOOD, **overrides}).dev
    assert dev.allowed_instance_hosts == ("127.0.0.1:8443",) and dev.ca_bundle == str(ca)
    prod = load_settings({**GOOD, **overrides, "APP_ENV": "production",
                          "WAVE_API_BASE_URL": "https://api.wave.test",
                          "WAVE_RETURN_URL_PREFIXES": "https://app.wave.test/"}).dev
    assert prod.allowed_instance_hosts == () and prod.ca_bundle is None and prod.entra_authority is None


@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf", "nan"])
def test_the_dev_dataverse_window_must_be_a_positive_number_of_seconds(value):
    assert load_settings({**GOOD, "DEV_DATAVERSE_WINDOW_SECONDS": "10"}).dev.dataverse_window_seconds == 10.0
    with pytest.raises(SettingsError) as err:
        load_settings({**GOOD, "DEV_DATAVERSE_WINDOW_SECONDS": value})
    assert err.value.name == "DEV_DATAVERSE_WINDOW_SECONDS"


def test_production_refuses_plain_http_for_wave():
    with pytest.raises(SettingsError) as err:
        load_settings({**GOOD, "APP_ENV": "production"})
    assert err.value.name == "WAVE_API_BASE_URL"


def test_every_documented_setting_is_in_the_example_file():
    import json

    example = json.loads((ROOT / "local.settings.example.json").read_text())
    documented = set(example["Values"]) | set(example.get("Comments", {}))
    assert set(APP_SETTINGS) - {"AzureWebJobsStorage__queueServiceUri", "AzureWebJobsStorage__tableServiceUri",
                                "AzureWebJobsStorage__clientId"} <= documented
    assert set(DEV_SETTINGS) <= documented


def test_dev_host_exits_with_a_one_line_error_naming_the_setting():
    env = {k: v for k, v in os.environ.items() if k not in APP_SETTINGS and k not in DEV_SETTINGS}
    env.update({**GOOD, "WAVE_API_BASE_URL": "not a url"})
    result = subprocess.run([sys.executable, "-m", "devstack.devhost", "--port", "0"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: setting WAVE_API_BASE_URL: must be an https URL (or http on localhost), "
                     "got 'not a url'"]


# -- unresolved Key Vault references ---------------------------------------------------------------

REFERENCES = ("@Microsoft.KeyVault(SecretUri=https://kv-wave.vault.azure.net/secrets/wave-webhook-secrets/0a1b2c)",
              "@Microsoft.KeyVault(VaultName=kv-wave;SecretName=wave-api-token)")


@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("name", ["WAVE_WEBHOOK_SECRETS", "WAVE_API_TOKEN", "DYNAMICS_CLIENT_SECRET",
                                  "KEY_VAULT_URL", "AzureWebJobsStorage", "WAVE_RETURN_URL_PREFIXES"])
def test_an_unresolved_key_vault_reference_is_refused_and_never_quoted(name, reference):
    with pytest.raises(SettingsError) as err:
        load_settings({**GOOD, name: reference})
    assert err.value.name == name
    assert "Key Vault reference" in err.value.problem
    assert "kv-wave" not in str(err.value) and "SecretUri" not in str(err.value)


def test_a_reference_in_a_list_entry_or_in_other_letter_case_is_refused_too():
    with pytest.raises(SettingsError) as err:
        load_settings({**GOOD, "WAVE_WEBHOOK_SECRETS": f"whsec_current_0123456789, {REFERENCES[1].lower()}"})
    assert err.value.name == "WAVE_WEBHOOK_SECRETS"


def test_a_value_that_merely_mentions_key_vault_is_served():
    settings = load_settings({**GOOD, "WAVE_API_TOKEN": "Microsoft.KeyVault-token-0123"})
    assert settings.wave_api_token == "Microsoft.KeyVault-token-0123"


def _sample_path(pattern: str) -> str:
    """A concrete path for one of the dev host's route patterns (route parameters filled in)."""
    path = re.sub(r"\(\?P<\w+>\[\^/\]\+\)\??", "acct_guard", pattern.removeprefix("^").removesuffix("$"))
    return "/api/" + re.sub(r"\\(.)", r"\1", path.removesuffix("/?"))


@pytest.fixture
def unresolved_webhook_secret(devhost, app_env):
    """The session's app with WAVE_WEBHOOK_SECRETS as App Service passes an unresolved reference on."""
    from core.settings import get_settings
    from functions.services import reset_services

    def reload() -> None:
        get_settings.cache_clear()
        reset_services()

    good = os.environ["WAVE_WEBHOOK_SECRETS"]
    os.environ["WAVE_WEBHOOK_SECRETS"] = REFERENCES[0]
    reload()
    try:
        yield REFERENCES[0]
    finally:
        os.environ["WAVE_WEBHOOK_SECRETS"] = good
        reload()


def test_with_an_unresolved_reference_health_and_every_route_answer_503_naming_the_setting(
        devhost, unresolved_webhook_secret):
    from tests.fixtures.stack import FUNCTION_KEY

    assert len(devhost.routes) >= 8
    for route in devhost.routes:
        method = sorted(route.methods or {"GET"})[0]
        res = requests.request(method, devhost.url + _sample_path(route.pattern.pattern), data=b"{}", timeout=30,
                               headers={"x-functions-key": FUNCTION_KEY, "Content-Type": "application/json"})
        assert res.status_code == 503, (route.name, res.status_code, res.text)
        error = res.json()["error"]
        assert error["code"] == "settings_invalid" and error["setting"] == "WAVE_WEBHOOK_SECRETS", route.name
        assert "Key Vault reference" in error["message"]
        assert "kv-wave" not in res.text and "SecretUri" not in res.text


def test_a_webhook_signed_with_the_reference_text_is_not_accepted(devhost, unresolved_webhook_secret):
    from sync.signature import HEADER, signature_header

    body = json.dumps({"id": "evt_kvref", "type": "contact.updated", "account_id": "acct_kvref",
                       "data": {"contact": {"id": "c_1", "version": 1}}}).encode()
    res = requests.post(f"{devhost.url}/api/webhooks/wave", data=body, timeout=30, headers={
        HEADER: signature_header(body, [unresolved_webhook_secret], int(time.time()))})
    assert res.status_code == 503 and res.json()["error"]["setting"] == "WAVE_WEBHOOK_SECRETS"


def test_health_is_200_again_once_the_setting_is_fixed(devhost):
    res = requests.get(f"{devhost.url}/api/health", timeout=30)
    assert res.status_code == 200 and res.json() == {"status": "ok"}


def test_a_queue_message_waits_for_a_fixed_setting_instead_of_failing_towards_poison(
        devhost, unresolved_webhook_secret, azurite):
    import logging

    import azure.functions as func

    from core.settings import StorageSettings
    from core.storage import ensure_queue, queue_client
    from functions.workers import wait_for_settings

    body = json.dumps({"account_id": "acct_settings_wait", "contact_id": "c_1", "version": 1,
                       "generation": "g1", "attempt": 0}).encode()
    msg = func.QueueMessage(id="m1", body=body)
    with ensure_queue(queue_client(StorageSettings(connection_string=azurite.connection_string),
                                   "settings-wait-test")) as queue:
        queue.clear_messages()
        assert wait_for_settings("settings-wait-test", msg, logging.getLogger("test")) is True
        # back on its queue, unchanged and not due before the delay, so no retry counts towards -poison
        assert queue.get_queue_properties().approximate_message_count == 1
        assert list(queue.receive_messages()) == []
        queue.delete_queue()


def test_with_usable_settings_a_queue_message_is_processed_at_once(devhost):
    import logging

    import azure.functions as func

    from functions.workers import wait_for_settings

    msg = func.QueueMessage(id="m2", body=b"{}")
    assert wait_for_settings("settings-wait-unused", msg, logging.getLogger("test")) is False
