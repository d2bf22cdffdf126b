"""Policy: Rego admission and dispatch rules, evaluated in-process or by an OPA server."""
