"""What a wire format gives the server, and the one registry the server finds them in.

Each module in app/api/wire/ registers a builder with `@adapter`; `build_adapters` imports every
module of that package and builds them in name order. The server never imports an adapter by name,
and adapters import this module, not the server: no import circle."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.errors import ConduitError


@dataclass
class Adapter:
    router: APIRouter
    error_response: Callable[[ConduitError], Response]
    prefixes: tuple[str, ...] = ()  # paths whose errors take this adapter's shape
    paths: tuple[str, ...] = ()  # exact paths likewise (TGI's `POST /` must not claim every path)
    default: bool = False  # its error shape answers wherever no adapter claims the path (OpenAI's)


_builders: dict[str, Callable] = {}


def adapter(build: Callable) -> Callable:
    """Registers `build(pipeline, config) -> Adapter` under its module's name."""
    _builders[build.__module__] = build
    return build


def build_adapters(pipeline, config) -> list[Adapter]:
    from app.api import wire

    for module in pkgutil.iter_modules(wire.__path__):
        importlib.import_module(f"{wire.__name__}.{module.name}")
    return [_builders[name](pipeline, config) for name in sorted(_builders)]


def request_id(request: Request) -> str:
    """The client's x-request-id, or one made for this request (the server's middleware sets it)."""
    return request.state.request_id
