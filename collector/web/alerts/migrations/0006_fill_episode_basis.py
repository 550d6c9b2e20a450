"""The basis of episodes open before 0004 (Rule.basis() as it was then), so that
editing their rule ends them as it ends newer ones."""

from typing import Any

from django.db import migrations

# Which kinds read `per` and `code` (models.KIND_FIELDS when this was written).
_PER = ("negative", "loyalty")
_CODE = ("health",)


def fill(apps: Any, schema_editor: Any) -> None:
    episode = apps.get_model("alerts", "Episode")
    for e in episode.objects.filter(basis="", resolved_at__isnull=True).select_related("rule"):
        r = e.rule
        e.basis = "|".join((r.kind, r.per if r.kind in _PER else "", r.site, r.edge, r.desk,
                            r.code if r.kind in _CODE else ""))
        e.save(update_fields=["basis"])


class Migration(migrations.Migration):

    dependencies = [
        ("alerts", "0005_episode_facts"),
    ]

    operations = [
        migrations.RunPython(fill, migrations.RunPython.noop),
    ]
