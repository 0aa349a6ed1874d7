"""Route secrets at rest: one Fernet token of a JSON list, keyed from SECRET_KEY.

Signing secrets are one token per route; a secret value in a step's config is one token
each, stored in the config's place as ``hub-sealed:<token>`` (``seal_one``).

The Fernet key is derived from the app's secret key with HKDF, so HUB_SECRET_KEY can be any
long random string and the same key never serves two purposes. If the secret key changes,
old tokens no longer open: that is ``SecretsUnreadable``, never a guess or a crash.
"""

from __future__ import annotations

import base64
import json

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flask import Flask, current_app

HKDF_INFO = b"hub route secrets"
MASK = "…"
# A secret value of a step's config as stored: this prefix and a token of a one-item list.
SEALED = "hub-sealed:"


class SecretsUnreadable(Exception):
    """The stored secrets do not decrypt with this secret key (it changed, or the row did)."""


class SecretBox:
    """Seals and opens a route's list of secrets."""

    def __init__(self, secret_key: str | bytes):
        if isinstance(secret_key, str):
            secret_key = secret_key.encode()
        if not secret_key:
            raise ValueError("an empty secret key cannot encrypt anything")
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(
            secret_key
        )
        self._fernet = Fernet(base64.urlsafe_b64encode(derived))

    def seal(self, secrets: list[str]) -> str:
        return self._fernet.encrypt(json.dumps(list(secrets)).encode()).decode("ascii")

    def open(self, token: str | None) -> list[str]:
        """The secrets in ``token`` (an empty list for None)."""
        if not token:
            return []
        try:
            data = json.loads(self._fernet.decrypt(token.encode("ascii")))
        except (InvalidToken, ValueError, UnicodeError):
            raise SecretsUnreadable(
                "stored route secrets do not decrypt with this HUB_SECRET_KEY"
            ) from None
        if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
            raise SecretsUnreadable("stored route secrets are not a list of strings")
        return data

    def seal_one(self, secret: str) -> str:
        """One secret as a string that can stand in its place (in a step's config)."""
        return SEALED + self.seal([secret])

    def open_one(self, sealed: str) -> str:
        """The secret in a ``seal_one`` string; SecretsUnreadable when it does not open."""
        opened = self.open(sealed[len(SEALED) :])
        if len(opened) != 1:
            raise SecretsUnreadable("a stored step secret is not one string")
        return opened[0]


def is_sealed(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SEALED)


def mask(secret: str) -> str:
    """``whsec_…abcd``: the well-known prefix and the last four characters, if long enough."""
    prefix = ""
    for known in ("whsec_", "shpss_", "shpca_"):
        if secret.startswith(known):
            prefix = known
    rest = secret[len(prefix) :]
    if len(rest) < 16:
        return prefix + MASK
    return f"{prefix}{MASK}{rest[-4:]}"


def looks_masked(secret: str) -> bool:
    return MASK in secret


def init_app(app: Flask) -> None:
    app.extensions["hub.secrets"] = SecretBox(app.config["SECRET_KEY"])


def get_box() -> SecretBox:
    """The current app's SecretBox, made by ``init_app`` from HUB_SECRET_KEY."""
    return current_app.extensions["hub.secrets"]
