"""Compliance exports: the model inventory as an ML-BOM, evidence packs, dispatch records."""
