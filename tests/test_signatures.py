"""Tests for hub.signatures: provider-published vectors, round trips and every refusal path."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from werkzeug.datastructures import Headers

from hub import signatures
from hub.signatures import (
    DEFAULT_TOLERANCE,
    SignatureError,
    StaleSignatureError,
    sign,
    signature_headers,
    validate_options,
    validate_secret,
    verify,
)

NOW = 1_700_000_000
BODY = b'{"event":"order.created","id":42}'

# A whsec_ secret is base64 of the key bytes; the others are used as given.
SECRETS = {
    "standard-webhooks": "whsec_" + base64.b64encode(b"standard-webhooks-key-0123456789").decode(),
    "github": "gh-secret-one",
    "stripe": "whsec_stripe_secret_used_verbatim",
    "slack": "8f742231b10e8888abcd99yyyzzz85a5",
    "shopify": "shpss_shopify_secret",
    "hmac": "generic-hmac-secret",
}
OTHER_SECRETS = {
    "standard-webhooks": "whsec_" + base64.b64encode(b"another-key-for-rotation-tests!!").decode(),
    "github": "gh-secret-two",
    "stripe": "whsec_another_stripe_secret",
    "slack": "another-slack-signing-secret",
    "shopify": "shpss_other_secret",
    "hmac": "other-hmac-secret",
}
# The schemes these tests sign with the hub's own signer (those that need code or a
# handshake are tests/test_providers_keys.py's).
SCHEMES = tuple(SECRETS)
HMAC_OPTIONS = {"header": "X-Signature", "prefix": "sha256="}
# The first built-ins, whose senders this file signs by hand; the later providers are proven in
# tests/test_providers_hmac.py.
SCHEMES = ("standard-webhooks", "github", "stripe", "slack", "shopify", "hmac")
OPTIONS = {scheme: (HMAC_OPTIONS if scheme == "hmac" else None) for scheme in SCHEMES}
TIMESTAMPED = ("standard-webhooks", "stripe", "slack")

# Published examples --------------------------------------------------------------------

# GitHub, "Validating webhook deliveries" -> "Testing the webhook payload validation".
GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_BODY = b"Hello, World!"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"

# Slack, "Verifying requests from Slack" worked example.
SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
SLACK_TIMESTAMP = 1531420618
SLACK_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow"
    b"&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner"
    b"&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com"
    b"%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
    b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)
SLACK_SIGNATURE = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"

# Standard Webhooks reference libraries' test vector.
SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SW_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SW_TIMESTAMP = 1614265330
SW_BODY = b'{"test": 2432232314}'
SW_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def signed(scheme: str, body: bytes = BODY, secret: str | None = None, ts: int = NOW) -> dict:
    return sign(
        scheme,
        body=body,
        secret=secret or SECRETS[scheme],
        timestamp=ts,
        msg_id="msg_test",
        options=OPTIONS[scheme],
    )


def check(scheme: str, headers, body: bytes = BODY, secrets=None, now: float = NOW, options=None):
    verify(
        scheme,
        body=body,
        headers=headers,
        secrets=secrets if secrets is not None else [SECRETS[scheme]],
        options=options if options is not None else OPTIONS[scheme],
        now=now,
    )


def reason_of(scheme: str, headers, **kwargs) -> str:
    with pytest.raises(SignatureError) as info:
        check(scheme, headers, **kwargs)
    assert type(info.value) is SignatureError  # not the stale subclass
    return info.value.reason


# ---------------------------------------------------------------------- published vectors


def test_github_published_vector_verifies():
    headers = {"X-Hub-Signature-256": GITHUB_SIGNATURE}
    verify("github", body=GITHUB_BODY, headers=headers, secrets=[GITHUB_SECRET])


def test_github_published_vector_is_what_sign_produces():
    headers = sign("github", body=GITHUB_BODY, secret=GITHUB_SECRET)
    assert headers == {"X-Hub-Signature-256": GITHUB_SIGNATURE}


def test_github_published_vector_rejects_other_body():
    headers = {"X-Hub-Signature-256": GITHUB_SIGNATURE}
    with pytest.raises(SignatureError):
        verify("github", body=b"Hello, World?", headers=headers, secrets=[GITHUB_SECRET])


@pytest.mark.parametrize("offset", [0, 120, -120])
def test_slack_published_vector_verifies(offset):
    headers = {
        "X-Slack-Request-Timestamp": str(SLACK_TIMESTAMP),
        "X-Slack-Signature": SLACK_SIGNATURE,
    }
    verify(
        "slack",
        body=SLACK_BODY,
        headers=headers,
        secrets=[SLACK_SECRET],
        now=SLACK_TIMESTAMP + offset,
    )


def test_slack_published_vector_is_what_sign_produces():
    headers = sign("slack", body=SLACK_BODY, secret=SLACK_SECRET, timestamp=SLACK_TIMESTAMP)
    assert headers == {
        "X-Slack-Request-Timestamp": str(SLACK_TIMESTAMP),
        "X-Slack-Signature": SLACK_SIGNATURE,
    }


def test_slack_published_vector_is_stale_today():
    headers = {
        "X-Slack-Request-Timestamp": str(SLACK_TIMESTAMP),
        "X-Slack-Signature": SLACK_SIGNATURE,
    }
    with pytest.raises(StaleSignatureError):
        verify("slack", body=SLACK_BODY, headers=headers, secrets=[SLACK_SECRET])


def test_standard_webhooks_published_vector_verifies():
    headers = {
        "webhook-id": SW_ID,
        "webhook-timestamp": str(SW_TIMESTAMP),
        "webhook-signature": SW_SIGNATURE,
    }
    verify(
        "standard-webhooks", body=SW_BODY, headers=headers, secrets=[SW_SECRET], now=SW_TIMESTAMP
    )


def test_standard_webhooks_published_vector_is_what_sign_produces():
    headers = sign(
        "standard-webhooks", body=SW_BODY, secret=SW_SECRET, timestamp=SW_TIMESTAMP, msg_id=SW_ID
    )
    assert headers == {
        "webhook-id": SW_ID,
        "webhook-timestamp": str(SW_TIMESTAMP),
        "webhook-signature": SW_SIGNATURE,
    }


def test_standard_webhooks_secret_without_prefix_or_padding_is_the_same_key():
    bare = SW_SECRET.removeprefix("whsec_")
    unpadded = base64.b64encode(b"key-of-31-bytes-needs-padding!!").decode().rstrip("=")
    assert unpadded != base64.b64encode(b"key-of-31-bytes-needs-padding!!").decode()
    headers = {
        "webhook-id": SW_ID,
        "webhook-timestamp": str(SW_TIMESTAMP),
        "webhook-signature": SW_SIGNATURE,
    }
    verify("standard-webhooks", body=SW_BODY, headers=headers, secrets=[bare], now=SW_TIMESTAMP)
    a = sign("standard-webhooks", body=BODY, secret="whsec_" + unpadded, timestamp=NOW, msg_id="m")
    b = sign("standard-webhooks", body=BODY, secret=unpadded + "=", timestamp=NOW, msg_id="m")
    assert a == b


# ---------------------------------------------------------------- independent computations


def _hmac(key: bytes, msg: bytes, algo=hashlib.sha256) -> bytes:
    return hmac.new(key, msg, algo).digest()


def test_stripe_uses_the_whsec_secret_verbatim_and_signs_t_dot_body():
    secret = SECRETS["stripe"]
    expected = _hmac(secret.encode(), f"{NOW}.".encode() + BODY).hex()
    assert signed("stripe") == {"Stripe-Signature": f"t={NOW},v1={expected}"}
    check("stripe", {"Stripe-Signature": f"t={NOW},v1={expected}"})


def test_shopify_is_base64_of_hmac_over_body():
    expected = base64.b64encode(_hmac(SECRETS["shopify"].encode(), BODY)).decode()
    assert signed("shopify") == {"X-Shopify-Hmac-Sha256": expected}
    check("shopify", {"X-Shopify-Hmac-Sha256": expected})


def test_standard_webhooks_key_is_the_decoded_secret():
    key = base64.b64decode(SECRETS["standard-webhooks"].removeprefix("whsec_"))
    mac = _hmac(key, f"msg_test.{NOW}.".encode() + BODY)
    assert (
        signed("standard-webhooks")["webhook-signature"] == "v1," + base64.b64encode(mac).decode()
    )


@pytest.mark.parametrize(
    ("options", "algo", "encode"),
    [
        ({"header": "X-Sig"}, hashlib.sha256, lambda d: d.hex()),
        (
            {"header": "X-Sig", "algorithm": "sha1", "prefix": "sha1="},
            hashlib.sha1,
            lambda d: "sha1=" + d.hex(),
        ),
        (
            {"header": "X-Sig", "algorithm": "sha512", "encoding": "base64"},
            hashlib.sha512,
            lambda d: base64.b64encode(d).decode(),
        ),
    ],
)
def test_hmac_scheme_matches_independent_computation(options, algo, encode):
    expected = encode(_hmac(b"k3y", BODY, algo))
    assert sign("hmac", body=BODY, secret="k3y", options=options) == {"X-Sig": expected}
    verify("hmac", body=BODY, headers={"x-sig": expected}, secrets=["k3y"], options=options)


def test_hmac_hex_comparison_is_case_insensitive():
    upper = "sha256=" + _hmac(SECRETS["hmac"].encode(), BODY).hex().upper()
    check("hmac", {"X-Signature": upper})


def test_github_hex_comparison_is_case_insensitive():
    value = signed("github")["X-Hub-Signature-256"]
    check("github", {"X-Hub-Signature-256": "sha256=" + value.split("=", 1)[1].upper()})


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip(scheme):
    check(scheme, signed(scheme))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_with_binary_and_empty_body(scheme):
    for body in (b"", bytes(range(256)), "héllo wörld".encode()):
        check(scheme, signed(scheme, body=body), body=body)


@pytest.mark.parametrize("scheme", TIMESTAMPED)
def test_sign_defaults_to_now(scheme):
    headers = sign(scheme, body=BODY, secret=SECRETS[scheme])
    verify(scheme, body=BODY, headers=headers, secrets=[SECRETS[scheme]])


def test_sign_generates_distinct_message_ids():
    a = sign("standard-webhooks", body=BODY, secret=SECRETS["standard-webhooks"])
    b = sign("standard-webhooks", body=BODY, secret=SECRETS["standard-webhooks"])
    assert a["webhook-id"].startswith("msg_")
    assert a["webhook-id"] != b["webhook-id"]


# ------------------------------------------------------------------------------ failures


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("tampered", [BODY + b" ", BODY.replace(b"42", b"43"), b""])
def test_tampered_body_fails(scheme, tampered):
    assert reason_of(scheme, signed(scheme), body=tampered) == "no signature matched"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_wrong_secret_fails(scheme):
    headers = signed(scheme, secret=OTHER_SECRETS[scheme])
    assert reason_of(scheme, headers) == "no signature matched"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_signatures_are_compared_in_constant_time(scheme, compared):
    """The match and the mismatch are both found by compare_digest: with ``==`` the time
    to refuse a guess would tell how many of its leading bytes were right."""
    check(scheme, signed(scheme))
    assert [result for _, _, result in compared].count(True) == 1
    compared.clear()
    reason_of(scheme, signed(scheme, secret=OTHER_SECRETS[scheme]))
    assert compared and not any(result for _, _, result in compared)


MISSING = [
    ("standard-webhooks", "webhook-id"),
    ("standard-webhooks", "webhook-timestamp"),
    ("standard-webhooks", "webhook-signature"),
    ("github", "X-Hub-Signature-256"),
    ("stripe", "Stripe-Signature"),
    ("slack", "X-Slack-Request-Timestamp"),
    ("slack", "X-Slack-Signature"),
    ("shopify", "X-Shopify-Hmac-Sha256"),
    ("hmac", "X-Signature"),
]
# Shopify's signature has two spellings (classic webhooks, Shopify Events): both are named.
ALSO = {"X-Shopify-Hmac-Sha256": " (or Shopify-Hmac-Sha256)"}


@pytest.mark.parametrize(("scheme", "header"), MISSING)
def test_missing_header_fails_with_its_name(scheme, header):
    headers = signed(scheme)
    assert header in headers
    del headers[header]
    assert reason_of(scheme, headers) == f"missing header {header}{ALSO.get(header, '')}"


@pytest.mark.parametrize(("scheme", "header"), MISSING)
def test_missing_header_is_reported_before_a_stale_timestamp(scheme, header):
    headers = signed(scheme, ts=NOW - 10 * DEFAULT_TOLERANCE)
    del headers[header]
    assert reason_of(scheme, headers) == f"missing header {header}{ALSO.get(header, '')}"


@pytest.mark.parametrize("scheme", TIMESTAMPED)
@pytest.mark.parametrize("age", [DEFAULT_TOLERANCE, -DEFAULT_TOLERANCE, 1, -1, 0])
def test_timestamp_just_inside_tolerance_passes(scheme, age):
    check(scheme, signed(scheme, ts=NOW - age))


@pytest.mark.parametrize("scheme", TIMESTAMPED)
@pytest.mark.parametrize("age", [DEFAULT_TOLERANCE + 1, -(DEFAULT_TOLERANCE + 1), 86400])
def test_timestamp_outside_tolerance_is_stale(scheme, age):
    with pytest.raises(StaleSignatureError) as info:
        check(scheme, signed(scheme, ts=NOW - age))
    assert info.value.code == "stale_signature"
    assert "tolerance" in info.value.reason
    assert str(info.value) == "Invalid signature"


@pytest.mark.parametrize("scheme", TIMESTAMPED)
def test_fractional_now_at_the_edge(scheme):
    check(scheme, signed(scheme, ts=NOW), now=NOW + DEFAULT_TOLERANCE)
    with pytest.raises(StaleSignatureError):
        check(scheme, signed(scheme, ts=NOW), now=NOW + DEFAULT_TOLERANCE + 0.5)


@pytest.mark.parametrize("scheme", TIMESTAMPED)
def test_tolerance_option_is_used(scheme):
    options = {"tolerance": 60}
    check(scheme, signed(scheme, ts=NOW - 60), options=options)
    with pytest.raises(StaleSignatureError):
        check(scheme, signed(scheme, ts=NOW - 61), options=options)
    # A longer tolerance admits what the default refuses.
    check(scheme, signed(scheme, ts=NOW - 600), options={"tolerance": 900})


@pytest.mark.parametrize("scheme", TIMESTAMPED)
def test_stale_check_happens_before_hmac(scheme):
    headers = signed(scheme, secret=OTHER_SECRETS[scheme], ts=NOW - 1000)
    with pytest.raises(StaleSignatureError):
        check(scheme, headers)


@pytest.mark.parametrize("scheme", TIMESTAMPED)
def test_replayed_signature_with_edited_timestamp_fails(scheme):
    """Moving a stale request's timestamp forward must break its signature."""
    headers = signed(scheme, ts=NOW - 1000)
    fresh = signed(scheme, ts=NOW)
    if scheme == "stripe":
        headers["Stripe-Signature"] = headers["Stripe-Signature"].replace(str(NOW - 1000), str(NOW))
    else:
        name = "webhook-timestamp" if scheme == "standard-webhooks" else "X-Slack-Request-Timestamp"
        headers[name] = fresh[name]
    assert reason_of(scheme, headers) == "no signature matched"


# ------------------------------------------------------------------ several signatures


def _good_sw_entry() -> str:
    return signed("standard-webhooks")["webhook-signature"]


def test_standard_webhooks_one_good_among_bad_entries_passes():
    good = _good_sw_entry()
    bad = signed("standard-webhooks", secret=OTHER_SECRETS["standard-webhooks"])
    value = f"v1,AAAA {bad['webhook-signature']} v1a,ZZZZ v1,!!notbase64!! {good} v2,xyz"
    check("standard-webhooks", {**signed("standard-webhooks"), "webhook-signature": value})


def test_standard_webhooks_only_bad_entries_fail():
    bad = signed("standard-webhooks", secret=OTHER_SECRETS["standard-webhooks"])
    value = f"v1,AAAA {bad['webhook-signature']}"
    headers = {**signed("standard-webhooks"), "webhook-signature": value}
    assert reason_of("standard-webhooks", headers) == "no signature matched"


def test_standard_webhooks_ignores_other_versions_even_with_the_right_value():
    good = _good_sw_entry()
    headers = {**signed("standard-webhooks"), "webhook-signature": good.replace("v1,", "v1a,")}
    reason = reason_of("standard-webhooks", headers)
    assert reason == "no v1 signature in webhook-signature header"


def test_stripe_one_good_v1_among_bad_passes():
    good = signed("stripe")["Stripe-Signature"].split(",")[1]
    value = f"t={NOW},v1={'0' * 64},{good},v1=deadbeef,v0={'1' * 64}"
    check("stripe", {"Stripe-Signature": value})


def test_stripe_ignores_v0_even_with_the_right_value():
    digest = signed("stripe")["Stripe-Signature"].split("v1=")[1]
    value = f"t={NOW},v1={'0' * 64},v0={digest}"
    assert reason_of("stripe", {"Stripe-Signature": value}) == "no signature matched"


def test_stripe_only_v0_is_no_v1_signature():
    digest = signed("stripe")["Stripe-Signature"].split("v1=")[1]
    value = f"t={NOW},v0={digest}"
    reason = reason_of("stripe", {"Stripe-Signature": value})
    assert reason == "no v1 signature in Stripe-Signature header"


# ----------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("scheme", SCHEMES)
def test_rotation_old_and_new_secret_both_verify(scheme):
    old, new = SECRETS[scheme], OTHER_SECRETS[scheme]
    for signer in (old, new):
        check(scheme, signed(scheme, secret=signer), secrets=[old, new])
        check(scheme, signed(scheme, secret=signer), secrets=[new, old])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_rotation_removed_secret_fails(scheme):
    old, new = SECRETS[scheme], OTHER_SECRETS[scheme]
    reason = reason_of(scheme, signed(scheme, secret=old), secrets=[new])
    assert reason == "no signature matched"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_no_secret_configured_fails(scheme):
    assert reason_of(scheme, signed(scheme), secrets=[]) == "no secret configured"


def test_unusable_secret_is_skipped_not_fatal():
    scheme = "standard-webhooks"
    check(scheme, signed(scheme), secrets=["whsec_!!!", "", SECRETS[scheme]])
    reason = reason_of(scheme, signed(scheme), secrets=["whsec_!!!", ""])
    assert reason == "no usable secret configured"


def test_single_string_instead_of_list_is_a_programming_error():
    with pytest.raises(TypeError):
        check("github", signed("github"), secrets=SECRETS["github"])


def test_str_body_is_a_programming_error():
    with pytest.raises(TypeError):
        check("github", signed("github"), body=BODY.decode())


# ---------------------------------------------------------------------- header lookup


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("case", [str.lower, str.upper, str.title])
def test_header_lookup_is_case_insensitive(scheme, case):
    headers = {case(name): value for name, value in signed(scheme).items()}
    check(scheme, headers)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_werkzeug_headers_are_accepted(scheme):
    headers = Headers()
    for name, value in signed(scheme).items():
        headers.add(name.upper(), value)
    headers.add("Content-Type", "application/json")
    check(scheme, headers)


def test_surrounding_whitespace_in_header_values_is_ignored():
    headers = {name: f"  {value} " for name, value in signed("slack").items()}
    check("slack", headers)


# ------------------------------------------------------------------- malformed headers

MALFORMED = [
    # (scheme, header, value, expected reason)
    ("github", "X-Hub-Signature-256", "", "empty header X-Hub-Signature-256"),
    ("github", "X-Hub-Signature-256", "   ", "empty header X-Hub-Signature-256"),
    ("github", "X-Hub-Signature-256", "garbage", "malformed X-Hub-Signature-256 header"),
    ("github", "X-Hub-Signature-256", "sha1=abcdef", "malformed X-Hub-Signature-256 header"),
    ("github", "X-Hub-Signature-256", "sha256=", "malformed X-Hub-Signature-256 header"),
    ("github", "X-Hub-Signature-256", "sha256=zzzz", "no signature matched"),
    ("github", "X-Hub-Signature-256", "sha256=ééé\udcff", "no signature matched"),
    ("stripe", "Stripe-Signature", "garbage", "malformed Stripe-Signature header"),
    ("stripe", "Stripe-Signature", ",,,=,=", "malformed Stripe-Signature header"),
    ("stripe", "Stripe-Signature", f"v1={'a' * 64}", "malformed Stripe-Signature header"),
    ("stripe", "Stripe-Signature", f"t={NOW}", "no v1 signature in Stripe-Signature header"),
    ("stripe", "Stripe-Signature", f"t={NOW},t={NOW},v1=ab", "malformed Stripe-Signature header"),
    ("stripe", "Stripe-Signature", "t=abc,v1=ab", "malformed timestamp"),
    ("stripe", "Stripe-Signature", f"t={NOW}.5,v1=ab", "malformed timestamp"),
    ("stripe", "Stripe-Signature", f"t=-{NOW},v1=ab", "malformed timestamp"),
    ("stripe", "Stripe-Signature", f"t={NOW},v1=é", "no signature matched"),
    ("slack", "X-Slack-Signature", "garbage", "malformed X-Slack-Signature header"),
    ("slack", "X-Slack-Signature", "v1=abcdef", "malformed X-Slack-Signature header"),
    ("slack", "X-Slack-Request-Timestamp", "yesterday", "malformed timestamp"),
    ("slack", "X-Slack-Request-Timestamp", "1e9", "malformed timestamp"),
    ("slack", "X-Slack-Request-Timestamp", "9" * 400, "malformed timestamp"),
    ("slack", "X-Slack-Request-Timestamp", "", "empty header X-Slack-Request-Timestamp"),
    ("standard-webhooks", "webhook-timestamp", "12.5", "malformed timestamp"),
    ("standard-webhooks", "webhook-timestamp", "١٢٣", "malformed timestamp"),
    (
        "standard-webhooks",
        "webhook-signature",
        "garbage",
        "no v1 signature in webhook-signature header",
    ),
    ("standard-webhooks", "webhook-signature", "v1,!!!notbase64", "no signature matched"),
    ("standard-webhooks", "webhook-signature", "v1,", "no signature matched"),
    ("standard-webhooks", "webhook-id", "", "empty header webhook-id"),
    (
        "shopify",
        "X-Shopify-Hmac-Sha256",
        "not base64!!",
        "malformed X-Shopify-Hmac-Sha256 header (not base64)",
    ),
    ("shopify", "X-Shopify-Hmac-Sha256", "AAAA", "no signature matched"),
    ("hmac", "X-Signature", "deadbeef", "header X-Signature lacks the configured prefix"),
    ("hmac", "X-Signature", "sha256=", "empty signature in header X-Signature"),
    ("hmac", "X-Signature", "sha256=not-hex", "no signature matched"),
]


@pytest.mark.parametrize(("scheme", "header", "value", "reason"), MALFORMED)
def test_malformed_header_gives_signature_error(scheme, header, value, reason):
    headers = signed(scheme)
    assert header in headers
    headers[header] = value
    assert reason_of(scheme, headers) == reason


def test_hmac_base64_encoding_rejects_bad_base64():
    options = {"header": "X-Sig", "encoding": "base64"}
    reason = reason_of("hmac", {"X-Sig": "%%%"}, secrets=["k"], options=options)
    assert reason == "malformed header X-Sig (not base64)"


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("headers", [{}, None, [], "X-Hub-Signature-256: x", {"other": "1"}])
def test_headers_without_the_signature_give_signature_error(scheme, headers):
    with pytest.raises(SignatureError) as info:
        check(scheme, headers)
    assert info.value.reason.startswith("missing header ")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_non_string_header_values_give_signature_error(scheme):
    headers = {name: 12345 for name in signed(scheme)}
    with pytest.raises(SignatureError):
        check(scheme, headers)


# ----------------------------------------------------------------- what the error shows


FAILURES = [
    ("tampered", lambda s: (signed(s), BODY + b"x")),
    ("wrong secret", lambda s: (signed(s, secret=OTHER_SECRETS[s]), BODY)),
    ("missing", lambda s: ({}, BODY)),
]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("label", "make"), FAILURES, ids=[f[0] for f in FAILURES])
def test_error_shows_only_invalid_signature_and_never_the_secret(scheme, label, make):
    headers, body = make(scheme)
    with pytest.raises(SignatureError) as info:
        check(scheme, headers, body=body)
    err = info.value
    assert str(err) == "Invalid signature"
    assert err.args == ("Invalid signature",)
    assert err.code == "bad_signature"
    assert err.reason
    correct = signed(scheme, body=body)
    for secret in (SECRETS[scheme], OTHER_SECRETS[scheme]):
        assert secret not in err.reason
        assert secret.removeprefix("whsec_") not in err.reason
    for value in correct.values():
        if value not in ("msg_test", str(NOW)):
            assert value not in err.reason


def test_stale_reason_does_not_contain_the_secret():
    with pytest.raises(StaleSignatureError) as info:
        check("slack", signed("slack", ts=NOW - 1000))
    assert SECRETS["slack"] not in info.value.reason
    assert isinstance(info.value, SignatureError)


# -------------------------------------------------------------------------- options


@pytest.mark.parametrize("scheme", TIMESTAMPED)
def test_validate_options_fills_default_tolerance(scheme):
    assert validate_options(scheme, None) == {"tolerance": DEFAULT_TOLERANCE}
    assert validate_options(scheme, {}) == {"tolerance": DEFAULT_TOLERANCE}
    assert validate_options(scheme, {"tolerance": 60}) == {"tolerance": 60}


@pytest.mark.parametrize("scheme", ["github", "shopify"])
def test_validate_options_for_untimestamped_schemes_is_empty(scheme):
    assert validate_options(scheme, None) == {}
    with pytest.raises(ValueError, match="takes no options"):
        validate_options(scheme, {"tolerance": 60})


def test_validate_options_hmac_defaults():
    assert validate_options("hmac", {"header": " X-Sig "}) == {
        "header": "X-Sig",
        "algorithm": "sha256",
        "encoding": "hex",
        "prefix": "",
    }


def test_validate_options_does_not_mutate_its_input():
    given = {"header": "X-Sig"}
    validate_options("hmac", given)
    assert given == {"header": "X-Sig"}


@pytest.mark.parametrize(
    ("scheme", "options", "message"),
    [
        (
            "nope",
            None,
            "Unknown signature scheme 'nope'; expected one of: standard-webhooks, github",
        ),
        ("GitHub", None, "Unknown signature scheme 'GitHub'"),
        ("hmac", None, "needs option 'header'"),
        ("hmac", {"header": ""}, "needs option 'header'"),
        ("hmac", {"header": 5}, "needs option 'header'"),
        ("hmac", {"header": "X Sig"}, "not a valid HTTP header name"),
        ("hmac", {"header": "X-Sig:"}, "not a valid HTTP header name"),
        (
            "hmac",
            {"header": "X-Sig", "algorithm": "md5"},
            "'algorithm' must be one of sha1, sha256, sha512",
        ),
        (
            "hmac",
            {"header": "X-Sig", "encoding": "base32"},
            "'encoding' must be one of hex, base64",
        ),
        ("hmac", {"header": "X-Sig", "prefix": 1}, "'prefix' must be a string"),
        ("hmac", {"header": "X-Sig", "tolerance": 60}, "Unknown option(s) 'tolerance'"),
        ("stripe", {"tolerance": 60, "secret": "x"}, "Unknown option(s) 'secret'"),
        ("slack", {"tolerance": "300"}, "whole number of seconds"),
        ("slack", {"tolerance": 1.5}, "whole number of seconds"),
        ("slack", {"tolerance": True}, "whole number of seconds"),
        ("standard-webhooks", {"tolerance": 0}, "between 1 and 86400"),
        ("standard-webhooks", {"tolerance": -5}, "between 1 and 86400"),
        ("standard-webhooks", {"tolerance": 86401}, "between 1 and 86400"),
        ("github", {"header": "X"}, "takes no options"),
        ("github", ["tolerance"], "must be a JSON object"),
    ],
)
def test_validate_options_refusals(scheme, options, message):
    with pytest.raises(ValueError) as info:
        validate_options(scheme, options)
    assert message in str(info.value)


def test_verify_with_bad_options_is_a_configuration_error():
    with pytest.raises(ValueError, match="needs option 'header'"):
        verify("hmac", body=BODY, headers={}, secrets=["k"])
    with pytest.raises(ValueError, match="Unknown signature scheme"):
        verify("telepathy", body=BODY, headers={}, secrets=["k"])


# -------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    ("scheme", "secret"),
    [
        ("standard-webhooks", SW_SECRET),
        ("standard-webhooks", SW_SECRET.removeprefix("whsec_")),
        ("standard-webhooks", "whsec_" + base64.b64encode(b"x" * 31).decode().rstrip("=")),
        ("github", GITHUB_SECRET),
        ("stripe", "whsec_not_base64_is_fine_for_stripe!"),
        ("slack", SLACK_SECRET),
        ("shopify", "s"),
        ("hmac", "any string at all"),
    ],
)
def test_validate_secret_accepts(scheme, secret):
    assert validate_secret(scheme, secret) == secret


@pytest.mark.parametrize(
    ("scheme", "secret", "message"),
    [
        ("github", "", "must not be empty"),
        ("hmac", None, "must be a string"),
        ("stripe", b"bytes", "must be a string"),
        ("standard-webhooks", "", "must not be empty"),
        ("standard-webhooks", "whsec_", "must not be empty after 'whsec_'"),
        ("standard-webhooks", "whsec_not*base64!", "not valid base64"),
        ("standard-webhooks", "plain words", "not valid base64"),
        ("standard-webhooks", "whsec_abcde", "not valid base64"),
        ("telepathy", "whsec_abcd", "Unknown signature scheme 'telepathy'"),
    ],
)
def test_validate_secret_refusals(scheme, secret, message):
    with pytest.raises(ValueError) as info:
        validate_secret(scheme, secret)
    assert message in str(info.value)
    if isinstance(secret, str) and secret.removeprefix("whsec_"):
        assert secret.removeprefix("whsec_") not in str(info.value)


def test_sign_refuses_a_bad_secret():
    with pytest.raises(ValueError, match="not valid base64"):
        sign("standard-webhooks", body=BODY, secret="whsec_***")
    with pytest.raises(ValueError, match="must not be empty"):
        sign("github", body=BODY, secret="")


# ----------------------------------------------------------------- signature_headers


@pytest.mark.parametrize(
    ("scheme", "options", "expected"),
    [
        ("standard-webhooks", None, {"webhook-signature"}),
        ("github", None, {"x-hub-signature-256"}),
        ("stripe", {"tolerance": 10}, {"stripe-signature"}),
        ("slack", None, {"x-slack-signature"}),
        ("shopify", None, {"x-shopify-hmac-sha256", "shopify-hmac-sha256"}),
        ("hmac", {"header": "X-My-Sig"}, {"x-my-sig"}),
    ],
)
def test_signature_headers(scheme, options, expected):
    assert signature_headers(scheme, options) == expected


@pytest.mark.parametrize("scheme", SCHEMES)
def test_signature_headers_cover_what_sign_emits(scheme):
    """Every emitted header except ids and timestamps (not secret) carries a MAC, so is redacted."""
    not_secret = {"webhook-id", "webhook-timestamp", "x-slack-request-timestamp"}
    emitted = {name.lower() for name in signed(scheme)}
    # Shopify Events sign in the unprefixed spelling of the one header sign() emits.
    other_spelling = {"shopify-hmac-sha256"} if scheme == "shopify" else set()
    assert signature_headers(scheme, OPTIONS[scheme]) == (emitted - not_secret) | other_spelling


def test_module_constants():
    assert signatures.SCHEMES[: len(SCHEMES)] == SCHEMES
    assert DEFAULT_TOLERANCE == 300
    assert issubclass(StaleSignatureError, SignatureError)
    assert SignatureError.code == "bad_signature"
    assert StaleSignatureError.code == "stale_signature"
