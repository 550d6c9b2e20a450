from django.apps import AppConfig


class WebConfig(AppConfig):
    name = "collector.web"
    label = "feedback"
    verbose_name = "Feedback quality management"
    default_auto_field = "django.db.models.BigAutoField"
