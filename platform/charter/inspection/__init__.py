"""Content inspection: personal data and secrets found in what a request carries."""
