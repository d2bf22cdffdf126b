"""End-to-end tests: real processes (identity provider), real PostgreSQL."""
