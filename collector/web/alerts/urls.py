from django.urls import URLPattern, URLResolver, path

from collector.web.alerts import views

app_name = "alerts"
urlpatterns: list[URLPattern | URLResolver] = [
    path("", views.alerts, name="alerts"),
    path("<int:pk>/", views.alert_detail, name="alert"),
    path("rules/", views.rules, name="rules"),
    path("rules/new/", views.rule_edit, name="rule_new"),
    path("rules/<int:pk>/", views.rule_edit, name="rule_edit"),
    path("rules/<int:pk>/toggle/", views.rule_toggle, name="rule_toggle"),
]
