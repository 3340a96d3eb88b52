"""API keys: `Authorization: Bearer KEY`, checked in constant time against the configured keys.

Keys come from an environment variable (comma-separated) and/or a secret file (one per line,
as a mounted Kubernetes secret gives). With no key configured the server is open, and says so
with a warning at start.
"""
from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

from cluster.api import APIError

log = logging.getLogger("deltaray.serve")


def load_keys(env_var: str | None, key_file: str | None) -> list[str]:
    keys = []
    if env_var and os.environ.get(env_var):
        keys += os.environ[env_var].split(",")
    if key_file:
        keys += Path(key_file).read_text().splitlines()
    return [k.strip() for k in keys if k.strip()]


class APIKeys:
    def __init__(self, keys: list[str]):
        self.keys = [k.encode() for k in keys]
        if not self.keys:
            log.warning("no API key configured: the endpoint is open to anyone who can reach it")

    def check(self, authorization: str | None) -> None:
        """Raise a 401 unless the header carries one of the keys."""
        if not self.keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        matched = False
        for key in self.keys:           # no early exit: the time taken does not tell which key
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")
