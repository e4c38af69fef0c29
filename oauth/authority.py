"""MSAL confidential clients for the Entra authority of an instance's cloud.

In Azure the authority is `https://<login host of the cloud>/<tenant>` (`organizations` while
connecting, the customer's tenant once it is known). In development, DEV_ENTRA_AUTHORITY (the local
stand-in, an OIDC issuer) replaces it, and DEV_CA_BUNDLE is trusted for its HTTPS.
"""

from __future__ import annotations

import warnings

import msal
import requests

from core.settings import Settings

TIMEOUT_SECONDS = 30
# The callback contract is GET with the code in the query (README "Connecting Dynamics"); PKCE, a single-use state and a
# no-referrer result page cover what form_post would add, so MSAL's per-call advice is only noise.
warnings.filterwarnings("ignore", message="response_mode='form_post' is recommended", category=UserWarning)


def http_session(settings: Settings) -> requests.Session:
    session = requests.Session()
    if settings.is_development and settings.dev.ca_bundle:
        session.verify = settings.dev.ca_bundle
        # requests lets REQUESTS_CA_BUNDLE from the environment override Session.verify (psf/requests#3829)
        session.trust_env = False
    return session


def confidential_client(settings: Settings, *, login_host: str, tenant: str = "organizations",
                        cache: msal.TokenCache | None = None) -> msal.ConfidentialClientApplication:
    """A client for the cloud of `login_host`; construction fetches the authority's metadata."""
    common = {
        "client_credential": settings.dynamics_client_secret,
        "token_cache": cache,
        "http_client": http_session(settings),
        "timeout": TIMEOUT_SECONDS,
    }
    if settings.is_development and settings.dev.entra_authority:
        return msal.ConfidentialClientApplication(
            settings.dynamics_client_id, oidc_authority=settings.dev.entra_authority, **common)
    if not login_host:
        raise ValueError("no Entra authority for this instance (development hosts need DEV_ENTRA_AUTHORITY)")
    return msal.ConfidentialClientApplication(
        settings.dynamics_client_id, authority=f"https://{login_host}/{tenant}", **common)
