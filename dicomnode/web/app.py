"""The ASGI application of the HTTP side: the routers, behind the credential check of :mod:`dicomnode.web.auth`.

FastAPI's own documentation pages (``/docs``, ``/redoc``) are off: they load
their scripts from a CDN, and the node may have no internet. The OpenAPI
document itself is served at ``/openapi.json``.
"""
from __future__ import annotations

import importlib.metadata

from fastapi import FastAPI

from dicomnode.web import api, health, metrics, pages
from dicomnode.web.auth import AuthMiddleware, Authenticator
from dicomnode.web.state import WebState


def _version() -> str:
    try:
        return importlib.metadata.version("dicomnode")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def create_app(state: WebState, authenticator: Authenticator | None = None) -> FastAPI:
    """The whole HTTP side for one node; ``authenticator`` is built from the settings when not given.

    Raises ValueError (one line) when the settings' credentials break the rule
    (beyond loopback without credentials, a credential that is not a hash).
    """
    auth = authenticator or Authenticator(state.settings)
    app = FastAPI(title="dicomnode", version=_version(), docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json",
                  description="The HTTP side of a glioma-grading DICOM node (research use only): status, events and "
                              "operator actions. Paths carry index ids only, never patient data.")
    app.include_router(api.router(state))
    app.include_router(health.router(state))
    app.include_router(metrics.router(state))
    app.include_router(pages.router(state))
    app.add_middleware(AuthMiddleware, authenticator=auth)
    return app
