"""Shared assertion for the app tests that check the service's error body (test_app_decode.py,
test_app_uploads.py); holds no tests. It lives here, not in test_app_support.py, only because that module was
outside the change that moved it."""

from __future__ import annotations

import httpx


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    """Assert the response is the service's error envelope with this status and code, so a test reads one line."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body
    return body["error"]
