"""Who may see what, checked on the server for every view (`role_required`),
and the user's chosen language applied to each request."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.utils import translation

from collector.web.models import Role, User

View = Callable[..., HttpResponse]

# What each role reaches (the menu shows the same).
REPORTS = (Role.QUALITY_MANAGER, Role.CLINIC_MANAGER, Role.ADMINISTRATOR)
CASES = (Role.QUALITY_MANAGER, Role.CALLBACK_OFFICER)
ADMIN = (Role.ADMINISTRATOR,)
MANAGE = (Role.QUALITY_MANAGER,)
# The clinic's names for sites, desks, receptionists and doctors (/names/).
NAMES = (Role.QUALITY_MANAGER, Role.ADMINISTRATOR)


def role_required(*roles: str) -> Callable[[View], View]:
    """Only logged-in, active users with one of `roles`; others get the login page
    (not logged in) or 403 (logged in, wrong role)."""
    def decorate(view: View) -> View:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            user = request.user
            if not user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            assert isinstance(user, User)  # noqa: S101 - AUTH_USER_MODEL
            if user.role not in roles or not user.is_active:
                raise PermissionDenied
            return view(request, *args, **kwargs)
        return wrapper
    return decorate


class UserLanguageMiddleware:
    """A logged-in user's chosen language wins over the browser's."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        user = getattr(request, "user", None)
        lang = getattr(user, "language", "") if user is not None else ""
        if lang:
            translation.activate(lang)
            request.LANGUAGE_CODE = lang
        response = self.get_response(request)
        if lang:
            response.headers.setdefault("Content-Language", lang)
        return response


def role_context(request: HttpRequest) -> dict[str, Any]:
    user = getattr(request, "user", None)
    role = getattr(user, "role", None)
    return {"can_reports": role in REPORTS, "can_cases": role in CASES,
            "can_admin": role in ADMIN, "can_manage": role in MANAGE}
