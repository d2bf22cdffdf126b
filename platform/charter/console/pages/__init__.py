"""The console's pages, one module a section; importing them adds their routes to the
console blueprint."""

from charter.console.pages import audit, models, nodes, overview  # noqa: F401
