"""A plain HTTP client for the REST API tests (urllib only, as a user's script would have)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

TIMEOUT = 30


def rest(server, path: str, body=None, raw: bytes | None = None, method: str | None = None):
    """`(status, parsed JSON body)` of one HTTP call to the server's REST port."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
