"""Making, revoking and checking API tokens, and their rate limit.

Every create and revoke is in the web app's audit (`cases.audit`): who, which
token (name and prefix), whether it may read personal data; never the secret.
Clock injected (`now`), as in `collector.web.cases`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from django.db import IntegrityError, connection, transaction

from collector.web import cases
from collector.web.api.models import NAME_RE, ApiToken
from collector.web.models import User

_TOKEN = re.compile(r"fc_([0-9a-f]{8})_([A-Za-z0-9_-]{43})")
# Bounds a token's limit may be set within: from one request in ~17 minutes
# (tests, a nightly export) to what one app instance serves anyway.
MIN_RATE_PER_S = 0.001
MAX_RATE_PER_S = 1000.0
MAX_BURST = 10_000


class TokenError(ValueError):
    """A token cannot be made or revoked as asked (the text says why)."""


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _who(user: User | None) -> str:
    return user.get_username() if user is not None else "(command line)"


def create(name: str, *, personal_data: bool, user: User | None, now: datetime,
           rate_per_s: float | None = None, burst: int | None = None) -> tuple[ApiToken, str]:
    """A new live token named `name`; returns it and the token text, which is
    stored nowhere (only its secret's SHA-256)."""
    if not re.fullmatch(NAME_RE, name):
        raise TokenError("a token's name is 1 to 64 letters, digits, '.', '_' or '-'")
    token = ApiToken(name=name, personal_data=personal_data, created_by=_who(user),
                     created_at=now)
    if rate_per_s is not None:
        if not MIN_RATE_PER_S <= rate_per_s <= MAX_RATE_PER_S:
            raise TokenError(f"the rate is {MIN_RATE_PER_S} to {MAX_RATE_PER_S} per second")
        token.rate_per_s = rate_per_s
    if burst is not None:
        if not 1 <= burst <= MAX_BURST:
            raise TokenError(f"the burst is 1 to {MAX_BURST} requests")
        token.burst = burst
    token.bucket, token.bucket_at = float(token.burst), time.time()
    secret = secrets.token_urlsafe(32)
    token.secret_hash = _digest(secret)
    for _attempt in range(5):
        token.prefix = secrets.token_hex(4)
        try:
            with transaction.atomic():
                token.save()
                cases.audit(user, "api_token_created", None,
                            f"{name} ({token.prefix}), personal data: "
                            f"{'yes' if personal_data else 'no'}", now=now)
        except IntegrityError as e:
            if ApiToken.objects.filter(name=name, revoked_at__isnull=True).exists():
                raise TokenError(f"a live token is already named {name}") from e
            token.pk = None
            continue  # the prefix was taken (1 in 4 billion): another
        return token, f"fc_{token.prefix}_{secret}"
    raise TokenError("no free prefix found; try again")


def revoke(token: ApiToken, *, user: User | None, now: datetime) -> bool:
    """Revoke a live token; False if it was revoked already."""
    with transaction.atomic():
        done = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
            revoked_at=now, revoked_by=_who(user))
        if done:
            cases.audit(user, "api_token_revoked", None, f"{token.name} ({token.prefix})",
                        now=now)
    return bool(done)


def authenticate(header: str) -> ApiToken | None:
    """The live token an `Authorization: Bearer ...` header names, or None."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    m = _TOKEN.fullmatch(value.strip())
    if m is None:
        return None
    try:
        token = ApiToken.objects.get(prefix=m.group(1))  # unique: no ORDER BY, no LIMIT
    except ApiToken.DoesNotExist:
        token = None
    # Compared in constant time: the prefix is not a secret, the hash's match is.
    if token is None or not hmac.compare_digest(token.secret_hash, _digest(m.group(2))):
        return None
    return None if token.revoked_at is not None else token


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after_s: int = 0  # when refused: whole seconds until a request is allowed


def take(token: ApiToken, *, now: datetime, now_s: float | None = None) -> Verdict:
    """Take one request from the token's bucket, in the database (module docstring
    of models.py): refill at `rate_per_s` up to `burst` since `bucket_at`, and
    take one if at least one is there, in one UPDATE, so two instances serving
    the same token at once never both take the last one.  `last_used_at` is set
    by the same statement.  A clock behind `bucket_at` (another host's) adds
    nothing rather than taking away."""
    t = time.time() if now_s is None else now_s
    refill = ("CASE WHEN %s > bucket_at THEN bucket + (%s - bucket_at) * rate_per_s "
              "ELSE bucket END")
    level = f"(CASE WHEN {refill} > burst THEN burst ELSE {refill} END)"
    table = connection.ops.quote_name(ApiToken._meta.db_table)
    with connection.cursor() as cur:
        cur.execute(
            f"UPDATE {table} SET bucket = {level} - 1, "  # noqa: S608 - constants only
            "bucket_at = CASE WHEN %s > bucket_at THEN %s ELSE bucket_at END, "
            f"last_used_at = %s WHERE id = %s AND {level} >= 1",
            [t, t, t, t, t, t, connection.ops.adapt_datetimefield_value(now), token.pk,
             t, t, t, t])
        if cur.rowcount:
            return Verdict(True)
    row = ApiToken.objects.filter(pk=token.pk).values_list(
        "bucket", "bucket_at", "rate_per_s").first()
    if row is None:
        return Verdict(False, 1)
    bucket, at, rate = row
    have = bucket + max(0.0, t - at) * rate
    return Verdict(False, max(1, math.ceil((1 - have) / rate)))
