from django.contrib.auth import views as auth_views
from django.urls import URLPattern, URLResolver, include, path

from collector.web import dashboards, views
from collector.web.api import urls as api_urls

urlpatterns: list[URLPattern | URLResolver] = [
    path("", views.home, name="home"),
    path("login/", auth_views.LoginView.as_view(template_name="web/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    # A new colleague's own password, from the link an administrator's "new user" sent.
    path("password/<uidb64>/<token>/", auth_views.PasswordResetConfirmView.as_view(
        template_name="web/password_set.html", success_url="/password/done/",
        post_reset_login=False), name="password_set"),
    path("password/done/", auth_views.PasswordResetCompleteView.as_view(
        template_name="web/password_done.html"), name="password_done"),
    path("cases/", views.queue, name="queue"),
    path("cases/rows/", views.queue_rows, name="queue_rows"),
    path("cases/<int:pk>/", views.case_detail, name="case"),
    path("cases/<int:pk>/<str:action>/", views.case_action, name="case_action"),
    path("audit/", views.audit_log, name="audit"),
    path("users/", views.users, name="users"),
    path("me/", views.profile, name="profile"),
    path("names/", views.display_names, name="names"),
    path("reports/", dashboards.dashboard, name="dashboard"),
    path("reports/doctors/", dashboards.doctors, name="dashboard_doctors"),
    path("reports/fleet/", dashboards.fleet, name="dashboard_fleet"),
    path("alerts/", include("collector.web.alerts.urls")),
    *api_urls.urlpatterns,  # the read API (/api/v1/...) and its token page (/api-tokens/)
]
