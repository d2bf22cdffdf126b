"""The console's pages, one module a section; importing them adds their routes to the
console blueprint."""

from charter.console.pages import (  # noqa: F401
    access,
    audit,
    batches,
    inspection,
    models,
    nodes,
    overview,
    policies,
    usage,
)
