"""A verifier with one byte of its rule changed fails its tests: proved for every built-in.

Each built-in provider's correctly signed requests come from the builders of
tests/test_providers.py, tests/test_providers_hmac.py and tests/test_providers_keys.py (the
senders' SDKs where they sign). The real declaration accepts them; then every declaration that
differs from it by one byte of one rule field must refuse them: ``SignatureError`` (or
``StaleSignatureError``) from the interpreter, or a ``ValueError`` when the model itself
refuses the mutated declaration (that counts as caught: such a rule can never be saved).

The mutations are generated from the declaration's fields, not written per provider: every
character of every rule text is changed to another (a letter to the next letter of the same
case, since header names and prefixes are matched without regard to case; a digit to the next
digit; punctuation to other punctuation), and every field with a fixed set of values (algorithm,
encoding, secret form, time unit, the code's encoding) is switched to each other value.
An empty text (a prefix Shopify does not have) has no byte to change.

Not mutated, because they are no part of what verifies a request:
- what the docs show: name, title, docs_url, setup, secret_text, code.secret_text;
- what only names a delivery for dedup (id_field, and id_headers the signature does not cover)
  or hides headers from storage (redact): tests/test_dedup.py and tests/test_redaction.py;
- the handshake (challenge), the options a route may set (options, code.options) and the
  verifier's import path (code.verifier), each tested with its provider;
- timestamp.tolerance, a number: a fresh request is inside any window; the stale-request tests
  of each provider hold the window.

A rule field is mutated for a request only where that request's verification reads it: an
HMAC secret never reads ``code``; a public key never reads the HMAC's algorithm (beside an
HMAC), encoding, secret form or versions; a static token (GitLab) is compared as it is, with
no encoding or secret form; of alternative header names (Shopify's classic and Events
spellings) only the one the request carries is read, so each spelling has its own request;
Twilio's bodySHA256 parameter only where the signed URL carries it.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

import pytest
from pydantic import BaseModel

from hub import providers, signatures
from hub.providers import Provider
from hub.signatures import SignatureError, SignedRequest
from tests import test_providers as first_six
from tests import test_providers_hmac as hmac_family
from tests import test_providers_keys as key_family

#: When every request is signed and checked: no clock is read.
NOW = 1_767_225_600

#: Fields that verify nothing (see the module's docstring), by their path in the declaration.
NOT_A_RULE = frozenset(
    {
        "name",
        "title",
        "docs_url",
        "setup",
        "secret_text",
        "id_field",
        "redact",
        "challenge",
        "options",
        "code.verifier",
        "code.secret_text",
        "code.options",
    }
)
#: What only an HMAC reads: not a static token, not a public key.
HMAC_ONLY = frozenset({"encoding", "secret", "signature_list.versions"})
#: Tuples whose names are alternatives: a request uses the first it carries.
ALTERNATIVES = frozenset({"signature_headers", "id_headers"})
#: Punctuation changed to punctuation, so a header name or a JSON path stays one where it can.
OTHER_PUNCTUATION = {
    "-": "_",
    "_": "-",
    ".": ":",
    ":": ".",
    "=": ":",
    ",": ";",
    ";": ",",
    " ": ";",
    "{": "(",
    "}": ")",
}


#: How a sender lists one signature per secret while two are live, as its docs say: only a
#: header of two entries or more reads a list's separator (Stripe's, Calendly's and Paddle's
#: always have two: the time and the signature).
ROTATION_SEPARATORS = {
    "standard-webhooks": " ",
    "svix": " ",
    "clerk": " ",
    "resend": " ",
    "pagerduty": ",",
}


class Signed(NamedTuple):
    """One correctly signed request and what its route would hold."""

    request: SignedRequest
    secrets: list[str]
    options: dict


def _signed(body: bytes, headers: dict, secrets: list[str], options: dict, url: str = "") -> Signed:
    url = url or options.get("url", "")  # the URL a route names, as the intake passes it
    return Signed(SignedRequest(body, headers, "POST", url), secrets, options)


def _with_rotation(name: str, headers: dict, during: dict, signed: Signed) -> list[Signed]:
    """``signed`` and, where the sender lists a signature per live secret, the same request
    signed during a rotation (``during``: the same request signed by the other secret)."""
    found = [signed]
    if name in ROTATION_SEPARATORS:
        header = providers.get(name).signature_headers[0]
        both = ROTATION_SEPARATORS[name].join((during[header], headers[header]))
        found.append(
            signed._replace(request=signed.request._replace(headers={**headers, header: both}))
        )
    return found


def _first_six(name: str) -> list[Signed]:
    secret, other = first_six.SECRETS[name], first_six.OTHER[name]
    options = first_six.verify_spec(name, [secret])["options"]
    body = first_six.BODY
    headers = first_six.sender_headers(name, body, secret, NOW)
    during = first_six.sender_headers(name, body, other, NOW)
    found = _with_rotation(name, headers, during, _signed(body, headers, [secret], options))
    if name == "shopify":
        found.append(_signed(body, first_six.shopify_events(headers), [secret], options))
    if name == "standard-webhooks":  # v1a: an Ed25519 public key
        private, public = first_six.ed25519_pair()
        v1a = first_six.v1a_headers(private, body, "msg_v1a", NOW)
        found.append(_signed(body, v1a, [public], options))
    return found


def _hmac_family(name: str) -> list[Signed]:
    secret, other = hmac_family.SECRETS[name]
    body, headers = hmac_family.send(name, secret, ts=NOW)
    during = hmac_family.headers_for(name, body, other, NOW, "d-1")
    options = hmac_family.spec(name, [secret])["options"]
    return _with_rotation(name, headers, during, _signed(body, headers, [secret], options))


def _key_family(name: str) -> list[Signed]:
    sender = key_family.SENDERS[name]
    headers = sender.headers(sender.body, sender.secret, NOW)
    found = [_signed(sender.body, headers, [sender.secret], sender.options)]
    if name == "twilio":  # a JSON body, covered by the URL's bodySHA256
        body = b'{"event": "x"}'
        url, signed = key_family.sign_twilio_json(body, sender.secret)
        found.append(_signed(body, signed, [sender.secret], sender.options, url))
    return found


def signed_requests() -> dict[str, list[Signed]]:
    """Every provider the three test modules sign for, with its signed requests."""
    found: dict[str, list[Signed]] = {}
    for names, build in (
        (first_six.SIGNED_HERE, _first_six),
        (hmac_family.NAMES, _hmac_family),
        (key_family.NAMES, _key_family),
    ):
        for name in names:
            found.setdefault(name, []).extend(build(name))
    return found


SIGNED = signed_requests()


# --------------------------------------------------------------------------- the mutations


def other_character(char: str) -> str:
    """Another character of the same kind: never the same letter in another case."""
    if char.isascii() and char.isalpha():
        base = ord("a") if char.islower() else ord("A")
        return chr(base + (ord(char) - base + 1) % 26)
    if char.isascii() and char.isdigit():
        return str((int(char) + 1) % 10)
    return OTHER_PUNCTUATION.get(char, "-")


def one_byte_changes(text: str) -> Iterator[str]:
    """``text`` with one character changed, for each of its characters."""
    for at, char in enumerate(text):
        yield text[:at] + other_character(char) + text[at + 1 :]


def _choices(annotation: Any) -> tuple[Any, ...]:
    """The values a field of a fixed set may take (a Literal's, and None when optional);
    () for any other field."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        values = tuple(v for arg in args for v in _choices(arg))
        return (*values, None) if values and type(None) in args else values
    return ()


def rule_changes(model: BaseModel, path: str = "") -> Iterator[tuple[str, str, str, Any]]:
    """(field path, what changed, the field of ``model`` it is in, that field's new value) for
    every one-byte change of a rule field of ``model``, nested models included."""
    for field, info in type(model).model_fields.items():
        where = f"{path}{field}"
        value = getattr(model, field)
        choices = _choices(info.annotation)
        if where in NOT_A_RULE:
            continue
        if isinstance(value, BaseModel):
            for inner, change, name, new in rule_changes(value, f"{where}."):
                yield inner, change, field, value.model_copy(update={name: new})
        elif choices and value in choices:
            for other in choices:
                if other != value:
                    yield where, f"{where} {value!r} -> {other!r}", field, other
        elif isinstance(value, str):
            for new in one_byte_changes(value):
                yield where, f"{where} {value!r} -> {new!r}", field, new
        elif isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            for index, item in enumerate(value):
                for new in one_byte_changes(item):
                    changed = (*value[:index], new, *value[index + 1 :])
                    yield (
                        f"{where}[{index}]",
                        f"{where}[{index}] {item!r} -> {new!r}",
                        field,
                        changed,
                    )


def _rebuilt(provider: Provider, field: str, value: Any) -> Provider:
    """The declaration with one field replaced, through the model so its validators run
    (those of a nested rule too)."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return Provider.model_validate({**provider.model_dump(), field: value})


def _unread(provider: Provider, signed: Signed) -> set[str]:
    """Rule fields this request's verification does not read (see the module's docstring)."""
    unread = set()
    by_key = any(signatures._is_code_secret(provider, s) for s in signed.secrets)
    if by_key:
        unread |= HMAC_ONLY | ({"algorithm"} if provider.algorithm else set())
    else:
        unread.add("code")
    if provider.algorithm == providers.TOKEN:
        unread |= HMAC_ONLY
    if not provider.signs_id:
        unread.add("id_headers")
    if provider.body_hash_param and f"{provider.body_hash_param}=" not in signed.request.url:
        unread.add("body_hash_param")
    sent = {name.lower(): value for name, value in signed.request.headers.items()}
    listing = provider.signature_list
    value = next((sent[h.lower()] for h in provider.signature_headers if h.lower() in sent), "")
    if listing and len(value.split(None if listing.separator == " " else listing.separator)) < 2:
        unread.add("signature_list.separator")
    for field in ALTERNATIVES:
        names = getattr(provider, field)
        used = next((i for i, name in enumerate(names) if name.lower() in sent), None)
        unread |= {f"{field}[{i}]" for i in range(len(names)) if i != used}
    return unread


def _is_read(path: str, unread: set[str]) -> bool:
    return not any(path == u or path.startswith((f"{u}.", f"{u}[")) for u in unread)


def mutations(provider: Provider, signed: Signed) -> Iterator[tuple[str, Provider | ValueError]]:
    """(what changed, the mutated declaration or the model's refusal of it) for every
    one-byte change of a rule field this request's verification reads."""
    unread = _unread(provider, signed)
    for path, change, field, value in rule_changes(provider):
        if not _is_read(path, unread):
            continue
        try:
            yield change, _rebuilt(provider, field, value)
        except ValueError as refused:  # pydantic's ValidationError is one
            yield change, refused


def _check(provider: Provider, signed: Signed) -> str | None:
    return signatures.check(
        provider, signed.request, signed.secrets, now=NOW, options=signed.options
    )


# --------------------------------------------------------------------------- the tests


def test_every_built_in_provider_has_signed_requests_here():
    """A new provider without a signed-request builder fails here, not silently."""
    assert set(SIGNED) == set(providers.BUILTIN_PROVIDERS)


def test_a_character_changes_to_another_never_to_itself_in_another_case():
    for char in "aAzZ09-_.:=,; {}$@~":
        other = other_character(char)
        assert other != char and other.lower() != char.lower()
    assert list(one_byte_changes("v0:")) == ["w0:", "v1:", "v0."]


@pytest.mark.parametrize("name", tuple(providers.BUILTIN_PROVIDERS))
def test_one_byte_changed_in_a_rule_refuses_the_signed_request(name):
    tried = 0
    for signed in SIGNED[name]:
        request = signed.request
        assert (
            signatures.verify(
                name,
                body=request.body,
                headers=request.headers,
                secrets=signed.secrets,
                options=signed.options,
                now=NOW,
                method=request.method,
                url=request.url,
            )
            in signed.secrets
        )
        real = signatures.configured(name, signed.options)  # the route's options applied
        # Rebuilt unchanged, the declaration still accepts: a refusal below is the byte's.
        assert _check(Provider.model_validate(real.model_dump()), signed) is not None
        accepted = []
        for change, mutant in mutations(real, signed):
            tried += 1
            if isinstance(mutant, ValueError):
                continue  # the model refuses it: such a rule cannot be declared
            try:
                _check(mutant, signed)
            except SignatureError:
                continue
            accepted.append(change)
        assert accepted == [], f"{name}: still accepted with {accepted}"
    assert tried > 0
