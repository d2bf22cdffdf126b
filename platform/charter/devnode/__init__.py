"""The local dev node: a tiny real model, built offline, for the demo and the tests."""
