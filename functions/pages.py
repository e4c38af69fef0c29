"""The small HTML pages the admin's browser may land on after Microsoft sign-in."""

from __future__ import annotations

from html import escape

import azure.functions as func

# No scripts, no external resources, no caching, no framing (clickjacking), and no Referer carrying the
# callback's query (or the completion code) onwards.
HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'"),
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title}</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;background:#f6f7f9;color:#1d2330;margin:0}}
main{{max-width:34rem;margin:12vh auto;background:#fff;border-radius:12px;padding:2rem 2.25rem;
box-shadow:0 1px 4px rgba(0,0,0,.08)}}h1{{font-size:1.35rem;margin:0 0 .75rem}}
.ok h1{{color:#116b3a}}.err h1{{color:#a3261b}}p{{margin:.5rem 0}}.muted{{color:#5b6475;font-size:.9rem}}</style>
</head><body><main class="{kind}"><h1>{title}</h1><p>{message}</p><p class="muted">{hint}</p></main></body></html>
"""


def page(title: str, message: str, *, ok: bool, status: int = 200,
         hint: str = "You can close this window and return to Wave.") -> func.HttpResponse:
    body = _PAGE.format(title=escape(title), message=escape(message), hint=escape(hint), kind="ok" if ok else "err")
    return func.HttpResponse(body, status_code=status, mimetype="text/html", charset="utf-8", headers=dict(HEADERS))


def redirect(location: str) -> func.HttpResponse:
    return func.HttpResponse(status_code=302, headers={"Location": location, **HEADERS})
