"""The web dashboard behind `fleetctl serve`.

- `feed`: follows the broker (retained desired/state/prompt/online, live events) and the
  controller's event log, folding them with `controller.follow.view` like `fleetctl watch`.
- `pages`: what each page and API route shows, as plain dicts and HTML fragments.
- `auth`: tokens (stored hashed), login sessions, CSRF, and who is allowed where.
- `app`: the aiohttp application: routes, actions, Server-Sent Event streams.
"""
