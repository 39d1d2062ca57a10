"""`mlximg serve`: an OpenAI-compatible image server on FastAPI and uvicorn that keeps models loaded.

Needs the `serve` extra: pip install 'mlximg[serve]'.
"""


def serve(settings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    from .app import create_app

    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
