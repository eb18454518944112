"""The authoritative record: one SQLAlchemy metadata (``schema``), its migrations, and one module per kind of row
(``studies``, ``jobs``, ``reports``). Imports only the bottom floor (config, logs, handoff)."""
