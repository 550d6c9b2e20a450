"""The read API (issue 19): `/api/v1/...`, a bearer token per integration.

A Django app of its own (label `api`): its token model and migrations, its
views and URLs, its OpenAPI document.  Everything it serves is read-only; the
figures are `collector.reports`' (the same functions as `feedback-collector
report` and the dashboards), the fleet `collector.queries.fleet_rows`.
"""
