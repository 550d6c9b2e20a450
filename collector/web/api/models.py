"""An integration's API token.

The token handed out is `fc_<prefix>_<secret>`: `prefix` (8 hex digits) is
stored in the clear, shown in lists and used to find the row; `secret` is 32
random bytes (URL-safe base64) of which only the SHA-256 is stored.  A token
is high-entropy, so a fast hash is right: nobody can guess 256 bits, and a
slow password hash would only cost every request time.  The secret is shown
once, when the token is made, and never stored, logged or audited.

The rate limit is a token bucket kept in the row itself (`bucket`, tokens
left at `bucket_at`, seconds since the epoch), taken from by one conditional
UPDATE per request (`tokens.take`), so several app instances share one limit
per token; Django's cache would be per process.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

# Names go into the audit and the CLI's arguments: a plain grammar.
NAME_RE = r"^[A-Za-z0-9_.-]{1,64}$"
DEFAULT_RATE_PER_S = 10.0
DEFAULT_BURST = 20


class ApiToken(models.Model):
    name = models.CharField(_("name"), max_length=64)
    prefix = models.CharField(max_length=16, unique=True)
    secret_hash = models.CharField(max_length=64)  # hex SHA-256 of the secret
    personal_data = models.BooleanField(_("personal data"), default=False)
    rate_per_s = models.FloatField(_("requests per second"), default=DEFAULT_RATE_PER_S)
    burst = models.PositiveIntegerField(_("burst"), default=DEFAULT_BURST)
    created_by = models.CharField(max_length=150)
    created_at = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.CharField(max_length=150, blank=True, default="")
    last_used_at = models.DateTimeField(null=True, blank=True)
    # The rate limit's bucket (module docstring): full when made.
    bucket = models.FloatField(default=DEFAULT_BURST)
    bucket_at = models.FloatField(default=0.0)

    class Meta:
        constraints: ClassVar[list[Any]] = [
            # A revoked token's name may be given again; two live ones never share one.
            models.UniqueConstraint(fields=["name"], condition=Q(revoked_at__isnull=True),
                                    name="api_one_live_token_per_name")]
        ordering: ClassVar[list[str]] = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix})"
