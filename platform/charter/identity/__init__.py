"""Identity: users, service accounts, roles and API keys."""
