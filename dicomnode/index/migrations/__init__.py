"""Alembic migrations of the index (``env.py``, ``versions/``); run them through :mod:`dicomnode.index.migrate`.

A package (not a loose folder) so the revisions ship inside the wheel and are
found next to the installed code: the node migrates its own database at
start-up, on hosts that have neither the source tree nor an ``alembic.ini``.
"""
