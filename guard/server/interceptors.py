"""Cross-cutting concerns for every RPC, kept out of the servicer."""

from __future__ import annotations

import inspect
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


class ExceptionInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions into gRPC statuses with messages (never a bare UNKNOWN)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(request, context):
                try:
                    return await inner_unary(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status, logged when internal
                    await _abort(context, method, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # Only async-generator streams are wrapped; coroutine streams (context.write, e.g. health Watch) pass through.
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            inner_stream = handler.unary_stream

            async def stream(request, context):
                try:
                    async for response in inner_stream(request, context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _abort(context, method, exc)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
