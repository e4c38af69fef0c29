"""Test-session wiring. Each area keeps its fixtures in tests/fixtures/<area>.py, listed here."""

pytest_plugins = [
    "tests.fixtures.stack",
    "tests.fixtures.dataverse",
    "tests.fixtures.browser",
    "tests.fixtures.sync",
    "tests.fixtures.identity",
]
