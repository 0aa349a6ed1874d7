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
        secret_text="whpk_ + base64 Ed25519 public key (v1a)",
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
