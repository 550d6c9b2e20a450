"""Dashboards (placeholder until the dashboard module lands)."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from collector.web.roles import REPORTS, role_required


@role_required(*REPORTS)
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "web/dashboard.html", {})
