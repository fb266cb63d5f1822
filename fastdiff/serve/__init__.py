"""`fastdiff serve`: a local studio page and a JSON API with dynamic batching (docs/serve.md).

create_app(models, out, limits, token) builds the FastAPI app; load_models reads the command line's models;
server.serve / server.background run it with uvicorn. Needs the `serve` extra (fastapi, uvicorn).
"""
from __future__ import annotations

from .app import GenerateRequest, Limits, create_app
from .models import ServedModel, load_models

__all__ = ["GenerateRequest", "Limits", "ServedModel", "create_app", "load_models"]
