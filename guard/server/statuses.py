"""Exceptions to gRPC statuses, for every Guard RPC, kept out of the servicer's logic."""

from __future__ import annotations

import functools
import logging
import math

import grpc

from guard.errors import ResourceExhausted, status_for

log = logging.getLogger(__name__)


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method, exc_info=exc)
    else:
        log.info("%s -> %s: %s", method, code.name, message)
    if isinstance(exc, ResourceExhausted):
        # gRPC's retry pushback: a client with a retry policy waits this long before trying again.
        context.set_trailing_metadata((("grpc-retry-pushback-ms", str(math.ceil(exc.retry_after * 1000))),))
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except Exception:  # noqa: BLE001 - the call already ended (its client gave up): nobody to tell
        log.debug("%s: could not send %s, the call had ended", method, code.name)


# Decorators on the servicer's methods rather than a grpc.aio interceptor: an interceptor runs for
# every call (awaited, building a new handler each time), measured at ~9% of guard's CPU per request.


def unary_statuses(method):
    """A unary RPC method whose exceptions become gRPC statuses with messages (never a bare UNKNOWN)."""
    rpc = method.__name__

    @functools.wraps(method)
    async def unary(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status, logged when internal
            await _abort(context, rpc, exc)

    return unary


def stream_statuses(method):
    """The same for a server-streaming RPC written as an async generator."""
    rpc = method.__name__

    @functools.wraps(method)
    async def stream(self, request, context: grpc.aio.ServicerContext):
        try:
            async for response in method(self, request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, rpc, exc)

    return stream
