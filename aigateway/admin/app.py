# -*- test-case-name: tests.test_admin -*-
"""
The Admin API's Klein app and the plumbing every endpoint shares: JSON
answers, Kong-style errors, body parsing, pagination and the generic
create/read/update/delete endpoints of one entity kind.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from ..store.interfaces import StoreUnavailable
from .entities import Entities, Record
from .errors import AdminError, bad_request
from .forms import parse_body

_log = Logger()
Handler = Callable[..., Awaitable[Any]]
DEFAULT_SIZE = 100
MAX_SIZE = 1000


def answer(request: IRequest, status: int, body: Any) -> bytes:
    """
    A JSON response.
    """
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    if body is None:
        return b""
    return json.dumps(body).encode("utf-8")


def endpoint(handler: Handler) -> Callable[..., Any]:
    """
    Wrap an async handler: its result is the JSON body (or a
    C{(status, body)} pair, or L{bytes} already rendered with their own
    content type), and an L{AdminError} becomes its Kong-shaped
    answer instead of a traceback.
    """

    @functools.wraps(handler)
    async def wrapper(request: IRequest, **kwargs: Any) -> bytes:
        try:
            result = await handler(request, **kwargs)
        except AdminError as error:
            return answer(request, error.status, error.body)
        except StoreUnavailable as error:
            _log.warn(
                "Admin API: the configuration store is unavailable: {error}",
                error=error,
            )
            message = (
                f"the configuration store is unavailable ({error}); the change "
                "may not have been saved: read it back before trying again"
            )
            return answer(request, 503, {"message": message})
        except CancelledError:
            # The client hung up (Klein cancels the handler): nobody to
            # answer, and nothing failed.
            raise
        except Exception:
            _log.failure(
                "Admin API request failed: {method} {uri}",
                method=request.method,
                uri=request.uri,
            )
            return answer(request, 500, {"message": "An unexpected error occurred"})
        if isinstance(result, bytes):
            return result
        if isinstance(result, tuple):
            return answer(request, *result)
        return answer(request, 200, result)

    return wrapper


def read_body(request: IRequest) -> tuple[dict[str, Any], bool]:
    """
    The request's body as a nested dict, and whether it was a form.
    """
    content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
    request.content.seek(0)
    return parse_body(content_type, request.content.read())


def paginate(request: IRequest, records: list[Record]) -> dict[str, Any]:
    """
    Kong's list shape: C{size} (default 100, at most 1000) and an opaque
    C{offset}; C{next} is the path of the following page, or null.
    """
    args = request.args
    raw_size = args.get(b"size", [b"%d" % DEFAULT_SIZE])[0]
    if not (raw_size.isdigit() and 1 <= int(raw_size[:5]) <= MAX_SIZE):
        raise AdminError(
            400,
            {
                "code": 9,
                "name": "invalid size",
                "message": f"size must be an integer between 1 and {MAX_SIZE}",
            },
        )
    size = int(raw_size)
    start = 0
    raw_offset = args.get(b"offset", [None])[0]
    if raw_offset:
        try:
            decoded = base64.urlsafe_b64decode(
                raw_offset + b"=" * (-len(raw_offset) % 4)
            )
        except ValueError:
            decoded = b""
        if not decoded.isdigit() or len(decoded) > 9:
            raise AdminError(
                400, {"code": 7, "name": "invalid offset", "message": "invalid offset"}
            )
        start = int(decoded)
    page = records[start : start + size]
    following = start + size
    if following < len(records):
        offset = base64.urlsafe_b64encode(b"%d" % following).decode().rstrip("=")
        # The next page is of the same list: the filter goes along.
        query = {"offset": offset, "size": size}
        if args.get(b"tags"):
            query["tags"] = args[b"tags"][0].decode("utf-8", "replace")
        path = request.path.decode("latin-1")
        return {
            "data": page,
            "next": f"{path}?{urlencode(query)}",
            "offset": offset,
        }
    return {"data": page, "next": None}


def tag_filter(request: IRequest) -> Callable[[Record], bool]:
    """
    Kong's C{?tags=} filter: C{a,b} keeps entities tagged with both,
    C{a/b} with either.
    """
    raw = request.args.get(b"tags", [b""])[0].decode("utf-8", "replace")
    if not raw:
        return lambda record: True
    if "," in raw and "/" in raw:
        raise bad_request("tags: use ',' (and) or '/' (or), not both")
    if "/" in raw:
        either = set(raw.split("/"))
        return lambda record: bool(either & set(record.get("tags") or ()))
    every = set(raw.split(","))
    return lambda record: every <= set(record.get("tags") or ())


def crud(
    app: Klein,
    entities: Entities,
    kind: str,
    collection: str,
    item: str,
    parent: Callable[[dict[str, Any]], str | None] = lambda kwargs: None,
    show: Callable[[Record], Record] = lambda record: record,
    listed: Callable[[Record], bool] = lambda record: True,
    post_updates: bool = False,
) -> None:
    """
    Register list/create on C{collection} and get/patch/put/delete on
    C{item} for one entity kind.

    @param parent: returns the owning entity's id from the URL's arguments
        (raising 404 when it does not exist), or L{None}.
    @param show: turns a stored record into what the API returns.
    @param listed: which records a plain list shows.
    @param post_updates: a POST naming an existing entity updates it (200)
        instead of failing with 409.
    """
    name = f"{kind}:{collection}"

    async def list_(request: IRequest, **kwargs: Any) -> Any:
        owner = parent(kwargs)
        wanted = tag_filter(request)
        records = [
            show(r) for r in entities.list(kind, owner) if listed(r) and wanted(r)
        ]
        return paginate(request, records)

    async def create(request: IRequest, **kwargs: Any) -> Any:
        owner = parent(kwargs)
        data, form = read_body(request)
        if post_updates:
            record, created = await entities.create_or_update(kind, data, form, owner)
            return (201 if created else 200), show(record)
        return 201, show(await entities.create(kind, data, form, owner))

    async def get(request: IRequest, ref: str, **kwargs: Any) -> Any:
        return show(entities.find(kind, ref, parent(kwargs)))

    async def patch(request: IRequest, ref: str, **kwargs: Any) -> Any:
        owner = parent(kwargs)
        data, form = read_body(request)
        return show(await entities.update(kind, ref, data, form, owner))

    async def put(request: IRequest, ref: str, **kwargs: Any) -> Any:
        owner = parent(kwargs)
        data, form = read_body(request)
        return show(await entities.upsert(kind, ref, data, form, owner))

    async def delete(request: IRequest, ref: str, **kwargs: Any) -> Any:
        await entities.delete(kind, ref, parent(kwargs))
        return 204, None

    app.route(collection, methods=["GET"], endpoint=name + ":list")(endpoint(list_))
    app.route(collection, methods=["POST"], endpoint=name + ":create")(endpoint(create))
    for method, handler in (
        ("GET", get),
        ("PATCH", patch),
        ("PUT", put),
        ("DELETE", delete),
    ):
        app.route(item, methods=[method], endpoint=f"{name}:{method}")(
            endpoint(handler)
        )


def handle_routing_errors(app: Klein) -> None:
    """
    JSON for unknown paths (404) and wrong methods (405).
    """

    @app.handle_errors(NotFound)
    def not_found(request: IRequest, failure: Any) -> bytes:
        return answer(request, 404, {"message": "Not found"})

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(request: IRequest, failure: Any) -> bytes:
        allowed = getattr(failure.value, "valid_methods", None)
        if allowed:
            request.setHeader(b"allow", ", ".join(sorted(allowed)).encode("ascii"))
        return answer(request, 405, {"message": "Method not allowed"})
