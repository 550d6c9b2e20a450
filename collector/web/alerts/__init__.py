"""Alerts (issue 19): rules kept in the collector's database, evaluated by the
web app's tick on an injected clock, delivered by e-mail and signed webhooks.

- models.py: `Rule` (what to watch, where, whom to tell, quiet hours),
  `Episode` (one alert: a condition from the moment it held until it cleared,
  with a stable UUID), `Delivery` (one message of an episode, opened or
  resolved, to one channel) and `Attempt` (each try, claimed before sending).
- conditions.py: each kind's condition: where it holds now, with its figures.
- engine.py: `evaluate(now)` opens and resolves episodes, `deliver(now)` sends
  what is due with back-off; `run(now)` is both (the tick's "alerts" step).
- channels.py: the e-mail and the webhook (JSON, HMAC-SHA256 signed).
- views.py, urls.py: the quality manager's pages; cli.py: `web alert-rule`.

Alerts carry identifiers (site, desk, edge, doctor, alarm codes, case
numbers), counts, indexes and times, never a phone number, comment or the
free text of an edge's alarm.
"""
