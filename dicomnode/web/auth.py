"""Credentials of the HTTP side, stored hashed, and who may see what.

The rule (docs/operations.md, "The HTTP side"):

- bound to loopback (127.0.0.0/8, ::1, ``localhost``) with no credentials
  configured, the HTTP side is open to whoever can reach loopback, but nobody
  counts as authenticated, so patient names and IDs are never shown;
- bound beyond loopback, every route but ``/healthz`` needs valid credentials,
  and starting there with none configured is a start-up error: a node on a
  hospital network must never serve its dashboard to anyone who asks;
- credentials, once configured, are needed on loopback too (a shared host).

Credentials are a bearer token (``Authorization: Bearer <token>``, checked
against ``http_token_hash``) and/or users with passwords (HTTP Basic,
``http_users``). Only scrypt hashes are stored (``dicomnode hash-secret``):
a leaked settings file gives nobody the dashboard.

The open loopback mode has two browser-borne holes that this module closes,
because "only loopback can reach it" is not true of a browser running on the
same host: DNS rebinding (a page whose host name resolves to 127.0.0.1 reads
the dashboard: the Host header must then name loopback) and cross-site form
posts to the retry buttons (a POST whose ``Sec-Fetch-Site`` or ``Origin`` says
it came from another site is refused, with or without credentials, since a
browser re-sends cached Basic credentials on its own).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import os
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

import anyio.to_thread

from dicomnode.config import Settings

SCHEME = "scrypt"
# scrypt's cost: 16 MiB and about 50 ms per check on one core here; the parameters travel in the stored
# string, so a later release can raise them without invalidating the hashes sites already hold.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_DKLEN = 32
_SALT_BYTES = 16
# routes that answer without credentials even beyond loopback: a load balancer or systemd probes liveness
OPEN_PATHS = frozenset({"/healthz"})
REALM = "dicomnode"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# where the middleware leaves the authenticated name (None: nobody) for the routes to read
USER_KEY = "dicomnode.user"


def hash_secret(secret: str) -> str:
    """The stored form of a token or password (for http_token_hash / http_users).

    ``scrypt$N$r$p$<salt base64>$<hash base64>``: self-describing, so
    :func:`verify_secret` needs nothing but the string.
    """
    if not secret:
        raise ValueError("an empty secret cannot be hashed: choose a token or password")
    salt = os.urandom(_SALT_BYTES)
    digest = _scrypt(secret, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, _DKLEN)
    return "$".join((SCHEME, str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest)))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen,
                          maxmem=256 * n * r * p + (1 << 20))


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = stored.strip().split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        return None
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        return None
    # bounds a hand-edited string cannot push past (memory 128*n*r bytes): 2^10..2^20, r, p 1..16
    if not (n >= 1024 and n & (n - 1) == 0 and n <= 2**20 and 1 <= r <= 16 and 1 <= p <= 16):
        return None
    if len(salt) < 8 or not 16 <= len(digest) <= 64:
        return None
    return n, r, p, salt, digest


def is_hash(stored: str) -> bool:
    """Whether ``stored`` is a hash :func:`hash_secret` made (and not, say, the plain token pasted in)."""
    return _parse(stored) is not None


def verify_secret(secret: str, stored: str) -> bool:
    """Whether ``secret`` is the one ``stored`` was made from; the final comparison is constant-time."""
    parsed = _parse(stored)
    if parsed is None or not secret:
        return False
    n, r, p, salt, digest = parsed
    return hmac.compare_digest(_scrypt(secret, salt, n, r, p, len(digest)), digest)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (bracketed or not) and ``localhost``; anything else (0.0.0.0 included) faces a network."""
    h = host.strip().lower().strip("[]")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _host_of(header: str) -> str:
    """The host name of a Host header (``"127.0.0.1:8081"``, ``"[::1]:8081"``, ``"localhost"``)."""
    header = header.strip()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Authenticator:
    """The configured credentials and the rule above; built at start-up, where a mistake stops the node.

    Raises ValueError (one line naming the setting) for a node bound beyond
    loopback without credentials, and for a credential that is not a hash.
    """

    def __init__(self, settings: Settings) -> None:
        self.host = settings.http_host
        self.token_hash = settings.http_token_hash.strip()
        self.users = {str(k): str(v).strip() for k, v in dict(settings.http_users).items()}
        if self.token_hash and not is_hash(self.token_hash):
            raise ValueError("http_token_hash is not a hash: store the output of `dicomnode hash-secret`, "
                             "never the token itself")
        bad = sorted(u for u, h in self.users.items() if not is_hash(h))
        if bad:
            raise ValueError(f"http_users: the password of {', '.join(bad)} is not a hash: store the output of "
                             "`dicomnode hash-secret`, never the password itself")
        self.configured = bool(self.token_hash or self.users)
        self.loopback = is_loopback(self.host)
        if not self.loopback and not self.configured:
            raise ValueError(f"http_host {self.host} faces the network but no credentials are configured: set "
                             "http_token_hash and/or http_users (`dicomnode hash-secret`), or bind http_host "
                             "to 127.0.0.1")
        # open: loopback without credentials; everything answers, nobody is authenticated
        self.open = not self.configured
        # checks that succeeded, keyed by an HMAC of (credential, stored hash) under a per-process key, so a
        # browser's every request does not pay scrypt's 50 ms; failures are never cached (nor cheap)
        self._key = os.urandom(32)
        self._good: dict[bytes, None] = {}
        self._lock = threading.Lock()
        # a user that does not exist still costs one scrypt check, so timing does not tell which names exist
        self._dummy = hash_secret(base64.b64encode(os.urandom(12)).decode())

    def _check(self, secret: str, stored: str) -> bool:
        key = hmac.new(self._key, secret.encode("utf-8", "replace") + b"\0" + stored.encode(), "sha256").digest()
        with self._lock:
            if key in self._good:
                return True
        ok = verify_secret(secret, stored)
        if ok:
            with self._lock:
                if len(self._good) >= 256:
                    self._good.clear()
                self._good[key] = None
        return ok

    def identify(self, authorization: str | None) -> str | None:
        """The authenticated name for an Authorization header (``"token"`` or the user), else None.

        Blocking (scrypt): the middleware runs it in a worker thread.
        """
        if not authorization or not self.configured:
            return None
        scheme, _, value = authorization.strip().partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and self.token_hash and value:
            return "token" if self._check(value, self.token_hash) else None
        if scheme == "basic" and self.users and value:
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (ValueError, binascii.Error, UnicodeDecodeError):
                return None
            if not sep:
                return None
            stored = self.users.get(user)
            if stored is None:
                self._check(password, self._dummy)
                return None
            return user if self._check(password, stored) else None
        return None

    def challenges(self) -> list[str]:
        """WWW-Authenticate values: Basic first (a browser then asks for a user and password)."""
        out = []
        if self.users:
            out.append(f'Basic realm="{REALM}", charset="UTF-8"')
        if self.token_hash:
            out.append(f'Bearer realm="{REALM}"')
        return out


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _cross_site(headers: dict[str, str]) -> bool:
    """A state-changing request a browser sent on behalf of another site (a form on a page elsewhere)."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = headers.get("origin")
    if origin and origin != "null":
        return urlsplit(origin).netloc.lower() != headers.get("host", "").lower()
    return origin == "null"


class AuthMiddleware:
    """ASGI middleware: every HTTP request but ``OPEN_PATHS`` passes the rule, or is answered here.

    Pure ASGI (not Starlette's BaseHTTPMiddleware) so that streamed responses
    (the summary PNG) pass through untouched.
    """

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self.app = app
        self.auth = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        path = scope.get("path", "")
        scope[USER_KEY] = None
        if scope.get("method", "GET") not in ("GET", "HEAD", "OPTIONS") and _cross_site(headers):
            await _reply(send, 403, "cross-site request refused: use the node's own pages", path)
            return
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.auth.open:
            if not is_loopback(_host_of(headers.get("host", ""))):
                # the port is loopback-only, so this is a browser sent here by a rebound DNS name
                await _reply(send, 403, "this node's HTTP side answers only to loopback host names; configure "
                                        "http_token_hash or http_users to serve other names", path)
                return
            await self.app(scope, receive, send)
            return
        user = await anyio.to_thread.run_sync(self.auth.identify, headers.get("authorization"))
        if user is None:
            await _reply(send, 401, "credentials required", path, challenges=self.auth.challenges())
            return
        scope[USER_KEY] = user
        await self.app(scope, receive, send)


async def _reply(send: Send, status: int, message: str, path: str, *, challenges: list[str] | None = None) -> None:
    """A short answer in the form the caller reads: JSON for the API, text for a person."""
    if path.startswith("/api/") or path in ("/metrics", "/readyz", "/openapi.json"):
        body, ctype = json.dumps({"detail": message}).encode(), b"application/json"
    else:
        body, ctype = f"{status}: {message}\n".encode(), b"text/plain; charset=utf-8"
    headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store")]
    headers += [(b"www-authenticate", c.encode()) for c in challenges or []]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def user_of(scope: Scope) -> str | None:
    """Who made this request (None: nobody authenticated, e.g. the open loopback mode)."""
    value = scope.get(USER_KEY)
    return value if isinstance(value, str) else None
