"""Inference nodes, their attestation, and deployments of approved versions onto them."""
