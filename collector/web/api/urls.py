"""The read API's URLs and its token page.

Included once, at the root of the app's URLs (collector/web/urls.py), so the
API stays under /api/v1/ and the quality manager's page sits with the other
pages at /api-tokens/.  `API_ROUTES` is what the OpenAPI document must
describe (tests/test_web_api.py checks both ways).
"""

from django.urls import URLPattern, URLResolver, path

from collector.web.api import views

PREFIX = "api/v1/"

urlpatterns: list[URLPattern | URLResolver] = [
    path(f"{PREFIX}events", views.events, name="api_events"),
    *(path(f"{PREFIX}reports/{what}", views.report, {"what": what},
           name=f"api_report_{what.replace('-', '_')}") for what in views.REPORTS),
    path(f"{PREFIX}fleet", views.fleet, name="api_fleet"),
    path(f"{PREFIX}alerts", views.alerts, name="api_alerts"),
    path(f"{PREFIX}openapi.json", views.openapi_document, name="api_openapi"),
    path("api-tokens/", views.token_page, name="api_tokens"),
    path("api-tokens/<int:pk>/revoke/", views.token_revoke, name="api_token_revoke"),
]
