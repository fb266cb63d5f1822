"""HTTP details of `fastdiff serve`: JSON errors, the request body (capped, parsed and validated here so every
mistake is one line naming its field, and the input is never echoed back), the Host header, and conditional
GETs of files that never change once saved."""
from __future__ import annotations

import json
import os
import re
from email.utils import formatdate, parsedate_to_datetime

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

MAX_BODY = 64 * 1024  # bytes of a POST body
HOST = re.compile(r"^(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::[0-9]{1,5})?$")  # RFC 9110 Host: name or [IPv6], port


class BodyError(Exception):
    """A request body that cannot be used: the status, a one-line detail and the field it names."""

    def __init__(self, status: int, detail: str, field: str | None = "body"):
        super().__init__(detail)
        self.status, self.detail, self.field = status, detail, field


def error(status: int, detail: str, field: str | None = None) -> JSONResponse:
    """The API's error: JSON {"detail", "field"}."""
    return JSONResponse({"detail": detail, "field": field}, status_code=status)


async def json_object(request: Request) -> dict:
    """The body as a JSON object ({} when empty: every field is optional), read up to MAX_BODY bytes;
    BodyError for a wrong Content-Type, an oversized body, invalid JSON or a non-object."""
    ctype = request.headers.get("content-type")
    if (ctype or "").split(";", 1)[0].strip().lower() != "application/json":
        raise BodyError(422, "the body must be JSON, sent with Content-Type: application/json (got "
                             f"{_short(ctype) if ctype else 'no Content-Type'})", "Content-Type")
    too_big = BodyError(413, f"the body is over {MAX_BODY // 1024} KiB (this server's limit)")
    length = request.headers.get("content-length", "0")
    if not length.isdigit() or int(length) > MAX_BODY:
        raise too_big
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise too_big
    if not raw.strip():
        return {}
    try:
        value = json.loads(bytes(raw).decode("utf-8"))
    except RecursionError:
        raise BodyError(422, "body is not valid JSON: nested too deeply") from None
    except json.JSONDecodeError as e:
        raise BodyError(422, f"body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:  # not UTF-8, an integer of more than 4300 digits
        raise BodyError(422, f"body is not valid JSON: {_short(str(e))}") from None
    if not isinstance(value, dict):
        raise BodyError(422, f"body must be a JSON object ({{...}}); got a JSON {type(value).__name__}")
    return value


def validated(model: type[BaseModel], data: dict) -> BaseModel:
    """data as `model`, or BodyError(422) naming the first bad field (without echoing its value)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False, include_context=False)
        fields = [".".join(str(p) for p in err["loc"]) or "body" for err in errors]
        detail = "; ".join(f"{f}: {err['msg']}" for f, err in zip(fields, errors))
        raise BodyError(422, detail, fields[0] if fields else "body") from None


def host_name(header: str | None) -> str | None:
    """The name part of a Host header ('localhost', '127.0.0.1', '[::1]'), or None when it is malformed."""
    match = HOST.match((header or "").lower())
    return match.group(1) if match else None


def file_validators(path: os.PathLike | str) -> dict[str, str]:
    """ETag and Last-Modified of a file (from its size and mtime), so clients can revalidate cheaply."""
    st = os.stat(path)
    return {"ETag": f'"{st.st_mtime_ns:x}-{st.st_size:x}"', "Last-Modified": formatdate(st.st_mtime, usegmt=True)}


def not_modified(request: Request, validators: dict[str, str]) -> Response | None:
    """A 304 response when the request's If-None-Match / If-Modified-Since match validators, else None."""
    match = request.headers.get("if-none-match")
    if match is not None:
        tags = [t.strip().removeprefix("W/") for t in match.split(",")]
        fresh = "*" in tags or validators["ETag"] in tags
    else:
        try:
            since = parsedate_to_datetime(request.headers["if-modified-since"])
            fresh = since >= parsedate_to_datetime(validators["Last-Modified"])
        except (KeyError, TypeError, ValueError):
            fresh = False
    return Response(status_code=304, headers=validators) if fresh else None


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
