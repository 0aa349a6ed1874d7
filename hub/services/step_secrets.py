"""Secrets in step configs: sealed at rest, masked when shown, opened when the step runs.

A string in a step's config is secret when its connector's Config declares it so
(``hub.connectors.Secret``, or a credential-named entry of ``CredentialHeaders``, such as the
http connector's ``Authorization`` header), or when it holds a hub API key (by shape, in any
field). ``seal_steps`` (routes.save_routes) replaces each one by ``hub-sealed:<token>``
(hub.store.crypto); ``shown_steps`` (the API, the CLI, the dashboard) replaces each by its mask
(``…abcd``); ``opened_config`` (the pipeline) gives the real values back, and the list of
them, which the attempt copy is scrubbed of.

An edit that sends a masked value back unchanged (the API's GET, then PUT; the dashboard's
form) keeps the stored secret: a masked value is matched with the value stored at the same
place, and refused when there is none (it is a mask, not a secret).

Routes saved by an older release, with secrets in clear, are sealed by ``db upgrade`` (and
``init``), through routes.seal_stored_secrets, and by any save (``routes apply``, API
PUT/PATCH, dashboard edit). Not by an Alembic migration: a migration has neither the
secret key nor the connectors' declarations. Until then they are masked by the same rules,
and their attempt copies scrubbed.

Cost, measured on a loaded 2-core machine: ``opened_config`` takes about 35 µs for a step
with one sealed header (3 µs of it the decryption, the rest a copy of the config) and 8 µs
for a step with none, against milliseconds for the connector's call.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from hub.connectors import Registry, secret_paths
from hub.ops.redact import KEY_SHAPE, is_credential_header
from hub.store.crypto import SecretBox, SecretsUnreadable, is_sealed, looks_masked, mask

Path = tuple[str | int, ...]
UNREADABLE = "[encrypted]"


def _leaves(value: Any, path: Path = ()) -> Iterator[tuple[Path, str]]:
    """Every string in a JSON-like value, with where it is."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))


def _get(value: Any, path: Path) -> Any:
    for part in path:
        found = (isinstance(value, dict) and part in value) or (
            isinstance(value, list) and isinstance(part, int) and part < len(value)
        )
        if not found:
            return None
        value = value[part]
    return value


def _set(value: Any, path: Path, new: str) -> None:
    for part in path[:-1]:
        value = value[part]
    value[path[-1]] = new


def _declared(registry: Registry | None, connector: str, config: dict) -> set[Path]:
    if registry is None or connector not in registry:
        # Without the connector's declaration, a credential-named entry inside a field
        # (a header) is taken for a secret: masked in excess, never shown in clear.
        return {
            p
            for p, _ in _leaves(config)
            if len(p) >= 2 and isinstance(p[-1], str) and is_credential_header(p[-1])
        }
    return set(secret_paths(registry.get(connector).Config, config))


def _is_secret(path: Path, value: str, declared: set[Path]) -> bool:
    return is_sealed(value) or path in declared or KEY_SHAPE.search(value) is not None


def _open(box: SecretBox | None, value: str) -> str | None:
    """A stored value in clear: opened when sealed; None when it cannot be opened."""
    if not is_sealed(value):
        return value
    if box is None:
        return None
    try:
        return box.open_one(value)
    except SecretsUnreadable:
        return None


def _before(stored: list[dict[str, Any]] | None, index: int, step: dict[str, Any]) -> dict:
    """The stored config of the step at ``index``, if it is the same connector's."""
    before = stored[index] if stored and index < len(stored) else {}
    if not isinstance(before, dict) or before.get("connector") != step.get("connector"):
        return {}
    return before.get("config") or {}


def restore_masks(steps: Any, box: SecretBox | None, stored: list[dict[str, Any]] | None) -> Any:
    """``steps`` with each mask sent back unchanged (the API's GET, then PUT; the dashboard's
    form) put back to the secret ``stored`` (the route's steps as saved) holds at that place."""
    if not isinstance(steps, list) or not stored:
        return steps
    out = copy.deepcopy(steps)
    for index, step in enumerate(out):
        if not isinstance(step, dict) or not isinstance(step.get("config"), dict):
            continue
        before = _before(stored, index, step)
        for path, value in list(_leaves(step["config"])):
            kept = _get(before, path)
            if looks_masked(value) and isinstance(kept, str):
                clear = _open(box, kept)
                if clear is not None and mask(clear) == value:
                    _set(step["config"], path, clear)
    return out


def seal_steps(
    steps: list[dict[str, Any]],
    registry: Registry,
    box: SecretBox | None,
    stored: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """``steps`` (in clear, validated) as they are stored: every secret sealed, an unchanged
    one with the token ``stored`` has for it. Returns the steps and the problems (a mask
    with no secret behind it, no key to seal with)."""
    out = copy.deepcopy(steps)
    problems: list[str] = []
    for index, step in enumerate(out):
        config = step.get("config") or {}
        before = _before(stored, index, step)
        declared = _declared(registry, step.get("connector", ""), config)
        for path, value in list(_leaves(config)):
            where = f"steps[{index}].config." + ".".join(str(p) for p in path)
            if path in declared and value == UNREADABLE:
                problems.append(
                    f"{where}: the stored secret does not open with this HUB_SECRET_KEY; "
                    "give it again"
                )
                continue
            if path in declared and looks_masked(value):
                problems.append(f"{where}: this is a masked secret as shown, not the secret")
                continue
            if not _is_secret(path, value, declared):
                continue
            if is_sealed(value):
                if _open(box, value) is None:
                    problems.append(f"{where}: a sealed value this hub cannot open")
                continue
            if box is None:
                problems.append(f"{where}: secrets cannot be stored without a key")
                continue
            kept = _get(before, path)
            if is_sealed(kept) and _open(box, kept) == value:
                _set(config, path, kept)  # unchanged: the same token, no needless write
            else:
                _set(config, path, box.seal_one(value))
    return out, problems


def opened_steps(steps: list[dict[str, Any]] | None, box: SecretBox | None) -> list[dict]:
    """The steps with every sealed value in clear (``[encrypted]`` where one does not
    open): what an edit starts from, and what "unchanged" compares."""
    out = copy.deepcopy(steps or [])
    for step in out:
        config = step.get("config")
        if isinstance(config, dict):
            for path, value in list(_leaves(config)):
                if is_sealed(value):
                    clear = _open(box, value)
                    _set(config, path, clear if clear is not None else UNREADABLE)
    return out


def shown_steps(
    steps: list[dict[str, Any]] | None, box: SecretBox | None, registry: Registry | None = None
) -> list[dict[str, Any]]:
    """The steps as any face shows them: each secret masked (``…abcd``), never in clear."""
    out = copy.deepcopy(steps or [])
    for step in out:
        config = step.get("config")
        if not isinstance(config, dict):
            continue
        declared = _declared(registry, step.get("connector", ""), config)
        for path, value in list(_leaves(config)):
            if _is_secret(path, value, declared):
                clear = _open(box, value)
                _set(config, path, mask(clear) if clear is not None else UNREADABLE)
    return out


def opened_config(
    config: dict[str, Any], box: SecretBox | None, registry: Registry, connector: str
) -> tuple[dict[str, Any], list[str]]:
    """A step's config with its secrets in clear, for the run, and those secrets (to cut
    from the attempt copy). SecretsUnreadable when a sealed value does not open."""
    declared = _declared(registry, connector, config)
    secrets: list[str] = []
    opened = config
    for path, value in list(_leaves(config)):
        if not _is_secret(path, value, declared):
            continue
        if is_sealed(value):
            if box is None:
                raise SecretsUnreadable("a step secret cannot be opened without the secret key")
            if opened is config:
                opened = copy.deepcopy(config)
            value = box.open_one(value)
            _set(opened, path, value)
        secrets.append(value)
        scheme, _, credential = value.partition(" ")
        if credential and scheme.isalpha() and len(credential) >= 8:
            secrets.append(credential)  # "Bearer abc...": the token alone, echoed back
    return opened, secrets
