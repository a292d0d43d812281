"""The OpenAPI document, built from the app's routes without starting anything."""

from __future__ import annotations

from typing import Any

from pydantic import SecretStr

from .app import create_app
from .config import Settings

# Placeholders only: building the spec needs an app object, never a database or a real key.
_SPEC_SETTINGS = {"database_url": "postgresql://spec@localhost/spec", "jwt_secret": SecretStr("s" * 32)}


def build_spec() -> dict[str, Any]:
    """The document served at /openapi.json, as committed in openapi/openapi.json."""
    app = create_app(Settings.model_validate(_SPEC_SETTINGS))
    return app.openapi()
