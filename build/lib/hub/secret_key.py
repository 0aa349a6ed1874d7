"""The app's secret key: from HUB_SECRET_KEY, or made once under instance/ in development."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from flask import Flask


class MissingSecretKey(SystemExit):
    """Stops the process with its message alone: a configuration error, not a crash."""


def init_app(app: Flask) -> None:
    if app.config.get("SECRET_KEY"):
        return
    if str(app.config.get("ENV", "development")).lower() == "production":
        raise MissingSecretKey(
            "HUB_SECRET_KEY is not set: production needs a fixed secret key "
            "(it encrypts route signing secrets); generate one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`"
        )
    path = Path(app.instance_path) / "secret_key"
    if not path.exists():
        # Write aside, then link into place: of several processes starting at once,
        # exactly one key wins and nobody reads a half-written file.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".secret_key.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    app.config["SECRET_KEY"] = path.read_text().strip()
