"""WSGI entry point for a production server (gunicorn collector.web.wsgi)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "collector.web.settings")
application = get_wsgi_application()
