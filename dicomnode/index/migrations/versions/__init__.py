"""The revisions, oldest first by file name (``0001_...``). Alembic skips this file."""
