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
