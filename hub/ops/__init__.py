"""What operators read: log lines, metrics, and what is redacted from both. Used by every layer,
importing none of them."""
