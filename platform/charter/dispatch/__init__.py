"""The governed gateway: OpenAI- and TGI-compatible endpoints routed to attested nodes."""
