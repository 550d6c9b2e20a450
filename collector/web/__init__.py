"""The quality manager's web app (Django), on the collector's database.

Roles (models.Role): the quality manager sees and assigns every callback case
and the audit; a callback officer works on the cases assigned to them, with
the phone; the clinic manager sees reports only, never a phone or comment;
the administrator manages users.  Layout: settings.py (from collector.toml's
[web]), models.py, cases.py (the workflow's rules, clock injected), roles.py
(server-side checks), views.py (callback pages), dashboards.py (reports),
cli.py (`feedback-collector web migrate|adduser|serve|tick`).
"""
