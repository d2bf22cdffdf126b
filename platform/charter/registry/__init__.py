"""Approved-model registry: models, pinned versions, lifecycle and four-eyes approval."""
