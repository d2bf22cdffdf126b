"""The console's pages, one module a section; importing them adds their routes to the
console blueprint."""

from charter.console.pages import access, audit, batches, models, nodes, overview, policies  # noqa: F401
