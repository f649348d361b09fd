"""`hybridmoe serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) over the engine's batch runner, and
the client that `chat --connect` and `repl --connect` use. No model code lives here."""
