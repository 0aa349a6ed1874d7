"""The hub's Alembic environment, installed as ``hub.migrations``.

In the repository this folder is ``migrations/`` at the top level; pyproject.toml maps it into
the ``hub`` package, in the wheel and in an editable install alike. A regular package (this
file) so that the editable install's finder resolves it: a namespace package nested under a
mapped parent is not found there. ``hub.store.db.MIGRATIONS`` asks the import system where it is.
"""
