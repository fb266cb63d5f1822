"""The FastAPI app of `fastdiff serve`: the studio page, the JSON API and its guards.

Everything is local: the page is static files shipped in the package (no CDN, no telemetry; a
Content-Security-Policy of 'self' holds the browser to that), FastAPI's Swagger/ReDoc pages (which load
their assets from a CDN) are off, and /docs is a small page rendered here from /openapi.json. With a
token every request needs it (Authorization: Bearer, the cookie the page gets, or ?token= once).
"""
from __future__ import annotations

import asyncio
import hmac
import html
import inspect
import re
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .. import __version__
from ..request import MAX_GUIDANCE, MAX_SEED, SampleRequest, default_steps, fastdiff_options
from ..multistep import FINAL_SIGMAS_TYPES
from ..schedule import SAMPLER_OPTIONS, SAMPLERS, SPACINGS, VARIANCE_TYPES
from .batcher import FINISHED, Batcher, Job, QueueFull, Stopped
from .gallery import SIDECAR, Gallery
from .models import ServedModel
from .record import run_info
from .server import check_token
from .web import BodyError, error, file_validators, host_name, json_object, not_modified, validated

STATIC = Path(__file__).parent / "static"
COOKIE = "fastdiff_token"
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


@dataclass(frozen=True)
class Limits:
    """What one server accepts: images per request, reverse steps, waiting jobs, images per batch."""

    max_n: int = 16
    max_steps: int = 1000
    max_queue: int = 64
    max_batch: int = 64
    window_ms: float = 20.0

    def __post_init__(self) -> None:
        for name in ("max_n", "max_steps", "max_queue", "max_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1; got {v!r}")
        if self.max_n > self.max_batch:
            raise ValueError(f"--max-n ({self.max_n}) must be <= --max-batch ({self.max_batch})")
        if not 0 <= self.window_ms <= 10_000:
            raise ValueError(f"--batch-window-ms must be in [0, 10000]; got {self.window_ms}")


class GenerateRequest(BaseModel):
    """POST /api/generate. Unset fields take the sampler's defaults; image i uses seed + i."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="a name from GET /api/models (default: the first)")
    sampler: Literal[SAMPLERS] = "ddim"  # type: ignore[valid-type]
    steps: int | None = Field(None, description="reverse steps (default: 50 for ddim, 20 for dpmpp-*, T for ddpm; "
                                                "at most the server's --max-steps)")
    n: int | None = Field(None, description="number of images (default: 4, or the server's --max-n if lower)")
    seed: int | None = Field(None, description=f"0 .. {MAX_SEED}; default: a random one (reported back)")
    eta: float | None = Field(None, description="DDIM noise scale (ddim only; default 0)")
    spacing: Literal[SPACINGS] | None = None  # type: ignore[valid-type]
    clip_sample: bool | None = None
    use_clipped_model_output: bool | None = Field(None, description="ddim only: re-derive ε from the clamped x0 "
                                                                   "(fastdiff's default when clipping)")
    variance_type: Literal[VARIANCE_TYPES] | None = Field(None, description="ddpm only")  # type: ignore[valid-type]
    solver_order: Literal[1, 2] | None = Field(None, description="dpmpp-* only (default 2)")
    lower_order_final: bool | None = Field(None, description="dpmpp-* only: first order at the end of short runs")
    final_sigmas_type: Literal[FINAL_SIGMAS_TYPES] | None = Field(  # type: ignore[valid-type]
        None, description="dpmpp-* only (default zero)")
    class_id: int | None = Field(None, description="class-conditional models: class id (-1: the null class)")
    guidance: float = Field(1.0, description=f"classifier-free guidance scale, 0 .. {MAX_GUIDANCE:g} (needs class_id)")


OPTION_FIELDS = ("eta", "spacing", "clip_sample", "use_clipped_model_output", "variance_type", "solver_order",
                 "lower_order_final", "final_sigmas_type")  # the sampler options a request may set


def _fastapi_kwargs() -> dict:
    kwargs = {"docs_url": None, "redoc_url": None, "swagger_ui_oauth2_redirect_url": None}
    params = inspect.signature(FastAPI.__init__).parameters
    if "telemetry" in params:  # FastAPI's native OpenTelemetry: off, exporters never configured from env
        kwargs["telemetry"] = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False,
                               "auto_configure": False}
    return kwargs  # the body's size cap is web.MAX_BODY, enforced (as JSON errors) by web.json_object


def create_app(models: dict[str, ServedModel], out: Path, limits: Limits = Limits(), token: str | None = None,
               allowed_hosts: tuple[str, ...] | None = None) -> FastAPI:
    """The app: models by name (the first is the default), the gallery folder, the limits, an optional token,
    and the Host names accepted (None: any; the CLI passes the loopback names when bound to loopback, which
    stops DNS-rebinding pages from reaching a token-less local server)."""
    if not models:
        raise ValueError("create_app needs at least one model")
    check_token(token)
    gallery = Gallery(out)

    def save(job: Job, images) -> str:
        name = gallery.new_name()
        gallery.save(name, images, run_info(job, name))
        return name

    batcher = Batcher(save, window_s=limits.window_ms / 1000, max_batch=limits.max_batch, max_queue=limits.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()
            gallery.close()

    app = FastAPI(title="fastdiff serve", version=__version__, lifespan=lifespan,
                  description="Local DDPM/DDIM sampling studio and JSON API (dynamic batching).", **_fastapi_kwargs())
    app.state.batcher, app.state.gallery, app.state.models, app.state.limits = batcher, gallery, models, limits
    default_openapi = app.openapi

    def openapi() -> dict:  # generate() parses its own body (web.json_object): list its schema by hand
        if app.openapi_schema is None:
            schemas = default_openapi().setdefault("components", {}).setdefault("schemas", {})
            schemas["GenerateRequest"] = GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        return app.openapi_schema

    app.openapi = openapi
    hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if hosts is not None:
            host = request.headers.get("host") or ""
            if host_name(host) not in hosts:
                return error(400, f"unexpected Host header {host[:100]!r}; use one of {', '.join(sorted(hosts))}",
                              "Host")
        from_query = False
        if token is not None:
            auth = request.headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.cookies.get(COOKIE)
            if given is None and "token" in request.query_params:
                given, from_query = request.query_params["token"], True
            if given is None or not hmac.compare_digest(given.encode(), token.encode()):
                response = error(401, "missing or wrong token: send 'Authorization: Bearer <token>' or open "
                                       "the page once as /?token=<token>")
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if from_query:
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):  # query parameters (the body: web.py)
        errors = jsonable_encoder(exc.errors())
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}" for e in errors]
        field = next((str(e["loc"][-1]) for e in errors if len(e.get("loc", ())) > 1), None)
        return error(422, "; ".join(parts), field)  # never the input back

    @app.exception_handler(HTTPException)
    async def httperror(request: Request, exc: HTTPException):  # unknown route (404), wrong method (405)
        response = error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    # --- the page ---------------------------------------------------------------------------------------
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        rows = "".join(
            f"<tr><td><code>{m.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
            f"<td>{html.escape(op.get('summary', ''))}</td></tr>"
            for path, ops in app.openapi()["paths"].items() for m, op in ops.items())
        return HTMLResponse(
            "<!doctype html><html><head><meta charset='utf-8'><title>fastdiff serve API</title>"
            "<link rel='stylesheet' href='/static/style.css'></head><body class='docs'><h1>fastdiff serve API</h1>"
            "<p>The full OpenAPI schema is at <a href='/openapi.json'>/openapi.json</a> (load it into any OpenAPI "
            "viewer). FastAPI's Swagger UI is off: it loads its scripts from a CDN, and this server fetches "
            f"nothing from the internet.</p><table>{rows}</table></body></html>")

    # --- the API ----------------------------------------------------------------------------------------
    @app.get("/healthz", summary="Liveness: the models, the queue and the worker's totals")
    def healthz() -> dict:
        return {"ok": True, "version": __version__, "models": list(models), "queued": batcher.queued,
                "stats": dict(batcher.stats)}

    @app.get("/api/models", summary="The models this server was started with, the samplers and its limits")
    def list_models() -> dict:
        """Each model with its default steps per sampler (capped at --max-steps); each sampler's options with
        the defaults a job runs with; the choices of the options that take a name; the limits."""
        return {"models": [{**m.describe(), "default_steps": {s: _default_steps(m, s, limits) for s in SAMPLERS}}
                           for m in models.values()],
                "default": next(iter(models)),
                "samplers": {k: {**v, **fastdiff_options(k, {})} for k, v in SAMPLER_OPTIONS.items()},  # what runs
                "choices": {"spacing": SPACINGS, "variance_type": VARIANCE_TYPES, "solver_order": [1, 2],
                            "final_sigmas_type": FINAL_SIGMAS_TYPES},
                "limits": {**limits.__dict__, "max_guidance": MAX_GUIDANCE, "max_seed": MAX_SEED}}

    @app.post("/api/generate", status_code=202, summary="Queue a sampling job; returns its id",
              openapi_extra={"requestBody": {"required": False, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/GenerateRequest"}}}}})
    async def generate(request: Request):
        try:
            body = validated(GenerateRequest, await json_object(request))
        except BodyError as e:
            return error(e.status, e.detail, e.field)
        name = next(iter(models)) if body.model is None else body.model
        if name not in models:
            return error(422, f"model must be one of {', '.join(models)}; got {name[:100]!r}", "model")
        model = models[name]
        n = min(4, limits.max_n) if body.n is None else body.n
        if n > limits.max_n:
            return error(422, f"n must be <= {limits.max_n} (this server's --max-n); got {n}", "n")
        if body.steps is not None and body.steps > limits.max_steps:
            return error(422, f"steps must be <= {limits.max_steps} (this server's --max-steps); got {body.steps}",
                          "steps")
        steps = _default_steps(model, body.sampler, limits) if body.steps is None else body.steps
        options = {k: v for k in OPTION_FIELDS if (v := getattr(body, k)) is not None}
        try:
            options = model.request_options(body.sampler, options)
        except (KeyError, ValueError) as e:
            return error(422, f"sampler {body.sampler}: {e}", "sampler")
        seed = body.seed if body.seed is not None else _random_seed()
        try:
            request = SampleRequest.checked(model.schedule, model.num_classes, n, sampler=body.sampler,
                                            steps=steps, seed=seed, classes=body.class_id,
                                            guidance=body.guidance, **options)
        except ValueError as e:
            return error(422, str(e), _field_of(str(e)))
        except ArithmeticError as e:  # an option so large that the schedule's arithmetic overflows
            return error(422, f"the options are out of range for {body.sampler} ({type(e).__name__}: {e})",
                          _field_of(str(e)))
        run_options = {**SAMPLER_OPTIONS[request.sampler], **request.options}  # every option as run, defaults too
        resolved = {k: run_options[k] for k in OPTION_FIELDS if k in run_options}
        params = {"model": name, "sampler": request.sampler, "steps": request.steps, "n": request.n, "seed": seed,
                  **resolved, "class_id": body.class_id, "guidance": request.guidance}  # resent: the same images
        try:
            job = batcher.submit(Job(model, request, params))
        except QueueFull as e:
            response = error(429, str(e))
            response.headers["Retry-After"] = "1"
            return response
        except Stopped as e:
            return error(503, str(e))
        return {"id": job.id, "status": job.status, "params": params, "url": f"/api/jobs/{job.id}"}

    @app.get("/api/jobs/{job_id}", summary="A job: status, steps done/total, and its files when done")
    async def job_status(job_id: str, wait: float = 0.0):
        """wait: up to this many seconds (at most 60) for the job to finish before answering (a long poll)."""
        snap = batcher.get(job_id)
        deadline = time.monotonic() + min(max(float(wait), 0.0), 60.0)
        while snap is not None and snap["status"] not in FINISHED and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            snap = batcher.get(job_id)
        if snap is None:
            return error(404, "no such job (ids are kept for the last 1000 jobs)")
        if snap["run"] is not None:
            snap.update(gallery.urls(snap["run"], snap["n"]))
        return snap

    @app.get("/api/history", summary="Past runs in the output folder, newest first")
    def history(limit: int = 50) -> dict:
        return {"runs": gallery.history(max(1, min(int(limit), 500)))}

    @app.head("/api/runs/{run}/{file}", include_in_schema=False)
    @app.get("/api/runs/{run}/{file}",
             summary="A file of a run: NNNN.png, grid.png or run.json (the sidecar without server paths)")
    def run_file(request: Request, run: str, file: str):
        """Saved files never change: ETag / Last-Modified let a client revalidate (304) instead of reloading."""
        path = gallery.file(run, file)
        info = gallery.sidecar(run) if file == SIDECAR and path is not None else None
        if path is None or (file == SIDECAR and info is None):
            return error(404, "no such file")
        try:
            headers = {**file_validators(path), "Cache-Control": "no-cache"}
        except OSError:
            return error(404, "no such file")
        if (fresh := not_modified(request, headers)) is not None:
            return fresh
        if info is not None:
            return JSONResponse(info, headers=headers)
        return FileResponse(path, media_type="image/png", headers=headers)

    return app


def _default_steps(model: ServedModel, sampler: str, limits: Limits) -> int:
    """The steps a request without `steps` runs: the sampler's default, at most the server's --max-steps."""
    return min(default_steps(sampler, model.schedule.num_train_timesteps), limits.max_steps)


def _random_seed() -> int:
    return secrets.randbelow(2**31)  # < 2^53: the page's JavaScript numbers hold it exactly


def _field_of(message: str) -> str | None:
    """The request field a SampleRequest error names (its messages start with the argument's name)."""
    match = re.match(r"[a-z_]+", message)
    name = match.group(0) if match else ""
    name = {"class": "class_id", "classes": "class_id"}.get(name, name)
    return name if name in GenerateRequest.model_fields else None


__all__ = ["GenerateRequest", "Limits", "create_app"]
