"""Credentials of the HTTP side, stored hashed."""
from __future__ import annotations


def hash_secret(secret: str) -> str:
    """The stored form of a token or password (for http_token_hash / http_users)."""
    raise NotImplementedError  # being written
