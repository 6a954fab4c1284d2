"""The OpenAI-compatible HTTP door (Starlette on uvicorn), on the same GuardService as gRPC."""
