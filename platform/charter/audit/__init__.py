"""Tamper-evident audit log: append-only, hash-chained, gapless."""
