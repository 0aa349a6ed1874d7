"""The built-in providers, each a declaration (see hub.providers).

Loaded through ``hub.providers.BUILTIN_PROVIDERS``, the path third-party entry points take.
A new provider is a ``Provider(...)`` here (or in its own package) and a line in the docs'
generated table (``python -m hub.providers --readme docs/providers.md``).
"""

from __future__ import annotations

from hub.providers import CodeRule, Provider, SignatureList, Timestamp

STANDARD_WEBHOOKS = Provider(
    name="standard-webhooks",
    title="Standard Webhooks (Svix, Clerk, Resend, ...)",
    docs_url="https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md",
    setup="the endpoint's signing secret (whsec_...) or, for v1a, its public key (whpk_...)",
    signature_headers=("webhook-signature",),
    signed_content="{id}.{timestamp}.{body}",
    encoding="base64",
    signature_list=SignatureList(separator=" ", pair=",", versions=("v1",)),
    timestamp=Timestamp(header="webhook-timestamp"),
    id_headers=("webhook-id",),
    secret="whsec",
    secret_text="whsec_ + base64 (v1, HMAC-SHA256)",
    code=CodeRule(
        verifier="hub.signatures:ED25519_V1A",
        secret_prefix="whpk_",
        versions=("v1a",),
        encoding="base64",
        secret_text="whpk_ + base64 Ed25519 public key (v1a), or the jwks_url option",
        options=("jwks_url",),
    ),
)

GITHUB = Provider(
    name="github",
    title="GitHub",
    docs_url="https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries",
    setup="Settings → Webhooks → Secret: the same string as the route's secret",
    signature_headers=("X-Hub-Signature-256",),
    prefix="sha256=",
    id_headers=("X-GitHub-Delivery",),
    secret_text="any string (you choose it)",
)

STRIPE = Provider(
    name="stripe",
    title="Stripe",
    docs_url="https://docs.stripe.com/webhooks#verify-manually",
    setup="Developers → Webhooks → the endpoint → Signing secret (whsec_...): paste it here",
    signature_headers=("Stripe-Signature",),
    signed_content="{timestamp}.{body}",
    signature_list=SignatureList(separator=",", pair="=", versions=("v1",)),
    timestamp=Timestamp(signature_key="t"),
    secret_text="the endpoint's whsec_... secret, used as it is",
)

SLACK = Provider(
    name="slack",
    title="Slack",
    docs_url="https://api.slack.com/authentication/verifying-requests-from-slack",
    setup="Basic Information → App Credentials → Signing Secret: paste it here",
    signature_headers=("X-Slack-Signature",),
    signed_content="v0:{timestamp}:{body}",
    prefix="v0=",
    timestamp=Timestamp(header="X-Slack-Request-Timestamp"),
    secret_text="the app's Signing Secret",
    challenge="slack-url-verification",
)

SHOPIFY = Provider(
    name="shopify",
    title="Shopify (webhooks and Events)",
    docs_url="https://shopify.dev/docs/apps/build/webhooks/subscribe/https",
    setup="the app's client secret (Partner Dashboard → the app → Client credentials)",
    # Classic webhooks send the X- names, Shopify Events the unprefixed ones.
    signature_headers=("X-Shopify-Hmac-Sha256", "Shopify-Hmac-Sha256"),
    encoding="base64",
    id_headers=("X-Shopify-Webhook-Id", "Shopify-Webhook-Id"),
    secret_text="the app's client secret",
)

HMAC = Provider(
    name="hmac",
    title="Any HMAC of the body (configured by the route's options)",
    docs_url="senders.md#sender-authentication",
    setup="the same secret on both sides; verify.options: header (required), algorithm, "
    "encoding, prefix",
    signature_headers=("X-Signature",),  # replaced by the route's required `header` option
    secret_text="any string",
    options=("header", "algorithm", "encoding", "prefix"),
)

# --------------------------------------------------------------------------- code or handshake

TWILIO = Provider(
    name="twilio",
    title="Twilio (voice, messaging and other webhooks)",
    docs_url="https://www.twilio.com/docs/usage/webhooks/webhooks-security",
    setup="Console → Account Info → Auth Token: paste it here; the webhook URL you give Twilio "
    "must be the route's url option or HUB_PUBLIC_URL + /hooks/NAME (Twilio signs the URL)",
    signature_headers=("X-Twilio-Signature",),
    # The URL as the sender called it, then each POST field's name and value sorted by name;
    # a JSON body is covered instead by the URL's bodySHA256 parameter.
    signed_content="{url}{form}",
    algorithm="sha1",
    encoding="base64",
    body_hash_param="bodySHA256",
    id_headers=("I-Twilio-Idempotency-Token",),
    secret_text="the account's Auth Token (HMAC-SHA1)",
)

SENDGRID = Provider(
    name="sendgrid",
    title="SendGrid Event Webhook (signed)",
    docs_url="https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/"
    "getting-started-event-webhook-security-features",
    setup="Settings → Mail Settings → Event Webhook → the webhook → Signature Verification on; "
    "paste its Verification Key (base64 public key) here",
    signature_headers=("X-Twilio-Email-Event-Webhook-Signature",),
    signed_content="{timestamp}{body}",
    algorithm=None,
    timestamp=Timestamp(header="X-Twilio-Email-Event-Webhook-Timestamp"),
    code=CodeRule(
        verifier="hub.signatures:ECDSA_P256",
        encoding="base64",
        secret_text="the Verification Key: base64 DER of an ECDSA P-256 public key",
    ),
)

DISCORD = Provider(
    name="discord",
    title="Discord interactions",
    docs_url="https://discord.com/developers/docs/interactions/overview"
    "#setting-up-an-endpoint-validating-security-request-headers",
    setup="Developer Portal → the application → General Information: paste its Public Key "
    "here, and set Interactions Endpoint URL to the route's URL (Discord sends a PING first)",
    signature_headers=("X-Signature-Ed25519",),
    signed_content="{timestamp}{body}",
    algorithm=None,
    timestamp=Timestamp(header="X-Signature-Timestamp"),
    challenge="discord-ping",
    code=CodeRule(
        verifier="hub.signatures:ED25519_HEX",
        encoding="hex",
        secret_text="the application's Public Key (64 hex digits, Ed25519)",
    ),
)

TWITCH = Provider(
    name="twitch",
    title="Twitch EventSub (webhook transport)",
    docs_url="https://dev.twitch.tv/docs/eventsub/handling-webhook-events/"
    "#verifying-the-event-message",
    setup="the secret you choose (10-100 characters) and send in the subscription's "
    "transport.secret; transport.callback is the route's URL",
    signature_headers=("Twitch-Eventsub-Message-Signature",),
    signed_content="{id}{timestamp}{body}",
    prefix="sha256=",
    timestamp=Timestamp(header="Twitch-Eventsub-Message-Timestamp", unit="rfc3339", tolerance=600),
    id_headers=("Twitch-Eventsub-Message-Id",),
    secret_text="the subscription's transport.secret",
    challenge="twitch-verification",
)

ZOOM = Provider(
    name="zoom",
    title="Zoom",
    docs_url="https://developers.zoom.us/docs/api/webhooks/#verify-webhook-events",
    setup="App Marketplace → the app → Features → Access → Secret Token: paste it here; the "
    "Event notification endpoint URL is the route's URL (then Validate)",
    signature_headers=("x-zm-signature",),
    signed_content="v0:{timestamp}:{body}",
    prefix="v0=",
    timestamp=Timestamp(header="x-zm-request-timestamp"),
    secret_text="the app's Secret Token",
    challenge="zoom-url-validation",
)

DROPBOX = Provider(
    name="dropbox",
    title="Dropbox",
    docs_url="https://www.dropbox.com/developers/reference/webhooks",
    setup="App Console → the app → Settings → App secret: paste it here; add the route's URL "
    "under Webhooks (Dropbox checks it with GET ?challenge=)",
    signature_headers=("X-Dropbox-Signature",),
    secret_text="the app's App secret",
    challenge="dropbox-challenge",
)


# ---------------------------------------------------------------- Svix and its senders


def _svix(name: str, title: str, docs_url: str, setup: str) -> Provider:
    """Svix signs for many senders: the Standard Webhooks rule under svix- header names."""
    return Provider(
        name=name,
        title=title,
        docs_url=docs_url,
        setup=setup,
        signature_headers=("svix-signature",),
        signed_content="{id}.{timestamp}.{body}",
        encoding="base64",
        signature_list=SignatureList(separator=" ", pair=",", versions=("v1",)),
        timestamp=Timestamp(header="svix-timestamp"),
        id_headers=("svix-id",),
        secret="whsec",
        secret_text="whsec_ + base64 (HMAC-SHA256)",
    )


SVIX = _svix(
    "svix",
    "Svix (any sender that delivers through Svix)",
    "https://docs.svix.com/receiving/verifying-payloads/how-manual",
    "the endpoint's Signing Secret (whsec_...), shown on the endpoint's page in the "
    "sender's Svix portal",
)
CLERK = _svix(
    "clerk",
    "Clerk",
    "https://clerk.com/docs/webhooks/sync-data",
    "Clerk Dashboard → Webhooks → the endpoint → Signing Secret (whsec_...)",
)
RESEND = _svix(
    "resend",
    "Resend",
    "https://resend.com/docs/dashboard/webhooks/verify-webhooks-requests",
    "Resend dashboard → Webhooks → the webhook → Signing Secret (whsec_...)",
)

# ---------------------------------------------------------------- code hosts, support, forms

GITLAB = Provider(
    name="gitlab",
    title="GitLab",
    docs_url="https://docs.gitlab.com/user/project/integrations/webhooks/#delivery-headers",
    setup="Settings → Webhooks → Secret token: the same string as the route's secret",
    signature_headers=("X-Gitlab-Token",),
    algorithm="token",
    # Idempotency-Key stays the same across GitLab's retries (17.4 and later); before it,
    # X-Gitlab-Event-UUID names the event.
    id_headers=("Idempotency-Key", "X-Gitlab-Event-UUID"),
    secret_text="the secret token (you choose it), sent as it is and compared in constant time",
)

INTERCOM = Provider(
    name="intercom",
    title="Intercom",
    docs_url="https://developers.intercom.com/docs/references/webhooks/webhook-models",
    setup="Developer Hub → your app → Basic information → Client secret",
    signature_headers=("X-Hub-Signature",),
    algorithm="sha1",
    prefix="sha1=",
    id_field="id",
    secret_text="the app's client secret",
)

TYPEFORM = Provider(
    name="typeform",
    title="Typeform",
    docs_url="https://www.typeform.com/developers/webhooks/secure-your-webhooks/",
    setup="the form → Connect → Webhooks → Edit → Secret: the same string as the route's secret",
    signature_headers=("Typeform-Signature",),
    encoding="base64",
    prefix="sha256=",
    id_field="event_id",
    secret_text="the webhook's secret (you choose it)",
)

LINEAR = Provider(
    name="linear",
    title="Linear",
    docs_url="https://linear.app/developers/webhooks#securing-webhooks",
    setup="Settings → API → Webhooks → the webhook → Signing secret",
    signature_headers=("Linear-Signature",),
    # Linear's time is in the signed body, in milliseconds; it asks for a minute at most.
    timestamp=Timestamp(body_field="webhookTimestamp", unit="ms", tolerance=60),
    id_headers=("Linear-Delivery",),
    secret_text="the webhook's signing secret",
)

CALENDLY = Provider(
    name="calendly",
    title="Calendly",
    docs_url="https://developer.calendly.com/api-docs/overview/webhooks/webhook-signatures",
    setup="the signing_key given when the webhook subscription was created (an OAuth app's: "
    "its Webhook signing key)",
    signature_headers=("Calendly-Webhook-Signature",),
    signed_content="{timestamp}.{body}",
    signature_list=SignatureList(separator=",", pair="=", versions=("v1",)),
    timestamp=Timestamp(signature_key="t", tolerance=180),
    secret_text="the subscription's webhook signing key",
)

PAGERDUTY = Provider(
    name="pagerduty",
    title="PagerDuty (v3 webhooks)",
    docs_url="https://github.com/PagerDuty/developer-docs/blob/main/docs/webhooks/04-Signatures.md",
    setup="Integrations → Generic Webhooks (v3) → New Webhook: the secret shown once, when "
    "the subscription is created",
    # Several v1= during a rotation, one per secret.
    signature_headers=("X-PagerDuty-Signature",),
    signature_list=SignatureList(separator=",", pair="=", versions=("v1",)),
    id_field="event.id",
    secret_text="the webhook subscription's secret",
)

HUBSPOT = Provider(
    name="hubspot",
    title="HubSpot (v3 signatures)",
    docs_url="https://developers.hubspot.com/docs/apps/developer-platform/build-apps/"
    "authentication/request-validation",
    setup="the app's Client secret (the app → Auth); HubSpot signs the URL: behind a proxy set "
    "HUB_TRUSTED_PROXIES, or the route's url option to the URL HubSpot was given",
    signature_headers=("X-HubSpot-Signature-v3",),
    signed_content="{method}{url}{body}{timestamp}",
    encoding="base64",
    timestamp=Timestamp(header="X-HubSpot-Request-Timestamp", unit="ms", tolerance=300),
    secret_text="the app's client secret",
)

# ---------------------------------------------------------------- payments, email, chat apps

PADDLE = Provider(
    name="paddle",
    title="Paddle Billing",
    docs_url="https://developer.paddle.com/webhooks/signature-verification",
    setup="Developer tools → Notifications → the destination → Secret key (pdl_ntfset_...)",
    signature_headers=("Paddle-Signature",),
    signed_content="{timestamp}:{body}",
    signature_list=SignatureList(separator=";", pair="=", versions=("h1",)),
    # Paddle's SDKs allow five seconds of drift; a route's tolerance option may widen it.
    timestamp=Timestamp(signature_key="ts", tolerance=5),
    id_field="event_id",
    secret_text="the notification destination's secret key",
)

SQUARE = Provider(
    name="square",
    title="Square",
    docs_url="https://developer.squareup.com/docs/webhooks/step3validate",
    setup="Developer Console → the app → Webhooks → Subscriptions → the subscription → "
    "Signature key; Square signs the notification URL: set the route's url option to it, "
    "exactly as entered there",
    signature_headers=("x-square-hmacsha256-signature",),
    signed_content="{url}{body}",
    encoding="base64",
    id_field="event_id",
    secret_text="the subscription's signature key",
)

MAILGUN = Provider(
    name="mailgun",
    title="Mailgun",
    docs_url="https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/"
    "securing-webhooks",
    setup="Send → Sending → Webhooks → HTTP webhook signing key",
    # The signature is in the JSON body: {"signature": {"timestamp", "token", "signature"}}.
    signature_field="signature.signature",
    signed_content="{timestamp}{json:signature.token}",
    timestamp=Timestamp(body_field="signature.timestamp"),
    # A token seen again is a replay: with a dedup_window the route refuses to run it twice.
    id_field="signature.token",
    secret_text="the HTTP webhook signing key",
)

META = Provider(
    name="meta",
    title="Meta (WhatsApp, Messenger, Instagram) webhooks",
    docs_url="https://developers.facebook.com/docs/graph-api/webhooks/getting-started",
    setup="App Dashboard → App settings → Basic → App Secret: paste it here; in Webhooks, "
    "Callback URL is the route's URL and Verify Token the route's verify_token option",
    signature_headers=("X-Hub-Signature-256",),
    prefix="sha256=",
    secret_text="the app's App Secret",
    challenge="meta-verify-token",
)

POSTMARK = Provider(
    name="postmark",
    title="Postmark (HTTP basic auth in the webhook URL)",
    docs_url="https://postmarkapp.com/developer/webhooks/webhooks-overview",
    setup="the webhook URL with credentials, https://USER:PASSWORD@hub.example.com/hooks/NAME; "
    "the route's secret is USER:PASSWORD",
    signature_headers=("Authorization",),
    algorithm=None,
    prefix="Basic ",
    code=CodeRule(
        verifier="hub.signatures:BASIC_AUTH",
        encoding="base64",
        secret_text="USER:PASSWORD, as written in the webhook URL (Postmark signs nothing)",
    ),
)

# ---------------------------------------------------------------- what small teams run

SENTRY = Provider(
    name="sentry",
    title="Sentry (integration platform)",
    docs_url="https://docs.sentry.io/integrations/integration-platform/webhooks/",
    setup="Settings → Developer Settings → Custom Integrations → the integration → Client Secret",
    signature_headers=("Sentry-Hook-Signature",),
    # Sentry-Hook-Timestamp is sent but not signed, so it guards nothing: no timestamp rule.
    id_headers=("Request-ID",),
    secret_text="the integration's client secret",
)

VERCEL = Provider(
    name="vercel",
    title="Vercel",
    docs_url="https://vercel.com/docs/webhooks/webhooks-api#securing-webhooks",
    setup="Team Settings → Webhooks: the secret shown once when the webhook is created (an "
    "integration's webhooks: its Client Secret)",
    signature_headers=("x-vercel-signature",),
    algorithm="sha1",
    id_field="id",
    secret_text="the webhook's secret",
)

LEMON_SQUEEZY = Provider(
    name="lemon-squeezy",
    title="Lemon Squeezy",
    docs_url="https://docs.lemonsqueezy.com/help/webhooks/signing-requests",
    setup="Settings → Webhooks → the webhook → Signing secret: the same string as the route's "
    "secret",
    signature_headers=("X-Signature",),
    secret_text="the webhook's signing secret (you choose it)",
)
