"""Django settings of the quality manager's web app, made from `collector.toml`.

The file is named by the environment variable FEEDBACK_COLLECTOR_CONFIG
(`feedback-collector web ...` sets it from --config).  The app's tables live in
the collector's own database (SQLite or PostgreSQL, `[database]`), created by
Django's migrations (`feedback-collector web migrate`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from collector.config import CONFIG_ENV, CollectorConfig, load_collector_config


def _config() -> CollectorConfig:
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"{CONFIG_ENV} names no collector.toml: run the app through "
                           "`feedback-collector web ... --config collector.toml`")
    return load_collector_config(Path(path))


def _secret_key(cfg: CollectorConfig) -> str:
    web = cfg.web
    if web.secret_key_file is not None:
        return web.secret_key_file.read_text(encoding="utf-8").strip()
    assert web.state_dir is not None  # noqa: S101 - parse_web always sets it
    path = web.state_dir / "web-secret-key"
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(50)
    # O_EXCL: of two instances starting at once, one key wins and both read it.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key + "\n")
    return key


def _database(cfg: CollectorConfig) -> dict[str, Any]:
    if cfg.dsn is None:
        assert cfg.db_path is not None  # noqa: S101 - the config gives one of the two
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": str(cfg.db_path),
                # The intake holds the write lock for a batch; wait for it.
                "OPTIONS": {"timeout": 30, "transaction_mode": "IMMEDIATE",
                            "init_command": "PRAGMA journal_mode=WAL; "
                                            "PRAGMA synchronous=NORMAL;"}}
    from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415 - PostgreSQL only

    params = {k: v for k, v in conninfo_to_dict(cfg.dsn).items() if v is not None}
    out: dict[str, Any] = {"ENGINE": "django.db.backends.postgresql",
                           "NAME": params.pop("dbname", ""), "USER": params.pop("user", ""),
                           "PASSWORD": params.pop("password", ""),
                           "HOST": params.pop("host", ""), "PORT": params.pop("port", ""),
                           "CONN_MAX_AGE": 60, "OPTIONS": params}
    return out


CONFIG = _config()
BASE_DIR = Path(__file__).resolve().parent
SECRET_KEY = _secret_key(CONFIG)
DEBUG = os.environ.get("FEEDBACK_WEB_DEBUG") == "1"
ALLOWED_HOSTS = list(CONFIG.web.allowed_hosts)
CSRF_TRUSTED_ORIGINS = [CONFIG.web.base_url]
if CONFIG.web.behind_proxy:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    USE_X_FORWARDED_HOST = True
SECURE = CONFIG.web.base_url.startswith("https://")
SESSION_COOKIE_SECURE = SECURE
CSRF_COOKIE_SECURE = SECURE
SESSION_COOKIE_AGE = 12 * 3600  # a working day
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",
    "collector.web.apps.WebConfig",
    "collector.web.alerts.apps.AlertsConfig",
    "collector.web.api.apps.ApiConfig",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "collector.web.roles.UserLanguageMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",
]
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend",
                           "django.contrib.auth.backends.ModelBackend"]
AUTH_USER_MODEL = "feedback.User"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
     "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Login throttling (django-axes): 5 failures for one user name from one address
# lock that pair out for 15 minutes.
AXES_FAILURE_LIMIT = 5
AXES_COOLOFF_TIME = 0.25  # hours
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "web/locked_out.html"
AXES_VERBOSE = False  # its log lines would carry user names
# The address a login comes from (django-ipware through axes): behind the
# reverse proxy the last X-Forwarded-For hop, the one the proxy itself added;
# otherwise the connection's own, whatever headers the client sends.
if CONFIG.web.behind_proxy:
    # The right-most entry: a client may send its own X-Forwarded-For, to which
    # the proxy appends the address it saw.
    AXES_IPWARE_PROXY_ORDER = "right-most"
    AXES_IPWARE_META_PRECEDENCE_ORDER: tuple[str, ...] = ("HTTP_X_FORWARDED_FOR",
                                                          "REMOTE_ADDR")
else:
    AXES_IPWARE_META_PRECEDENCE_ORDER = ("REMOTE_ADDR",)
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

ROOT_URLCONF = "collector.web.urls"
WSGI_APPLICATION = "collector.web.wsgi.application"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [],
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.template.context_processors.i18n",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
        "collector.web.roles.role_context",
    ]},
}]
DATABASES = {"default": _database(CONFIG)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("ru", "Русский")]
LOCALE_PATHS = [BASE_DIR / "locale"]
USE_I18N = True
USE_TZ = True
TIME_ZONE = CONFIG.tz

STATIC_URL = "static/"
STATIC_ROOT = CONFIG.web.state_dir / "static" if CONFIG.web.state_dir else None

if CONFIG.web.smtp is not None:
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_HOST = CONFIG.web.smtp.host
    EMAIL_PORT = CONFIG.web.smtp.port
    EMAIL_USE_TLS = CONFIG.web.smtp.security == "starttls"
    EMAIL_USE_SSL = CONFIG.web.smtp.security == "tls"
    EMAIL_HOST_USER = CONFIG.web.smtp.username or ""
    EMAIL_HOST_PASSWORD = CONFIG.web.smtp.password or ""
    EMAIL_TIMEOUT = 20
    DEFAULT_FROM_EMAIL = CONFIG.web.smtp.sender
else:
    # No SMTP configured: nothing is e-mailed (the app says so where it matters),
    # and no file anywhere keeps a patient's address.
    EMAIL_BACKEND = "django.core.mail.backends.dummy.EmailBackend"
    DEFAULT_FROM_EMAIL = "feedback-collector@localhost"

# Personal data never goes into logs: Django's request logging shows paths
# (case numbers), never bodies; errors are logged without local variables.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {"django.request": {"handlers": ["console"], "level": "ERROR",
                                   "propagate": False}},
}
