"""The playground: a page at / and /playground that chats with this server through its own OpenAI routes.

Plain HTML, CSS and JavaScript modules shipped inside the package (foundry/serve/playground/): no build step,
no CDN. The page and its files are public, as a page must be for a browser to open it; they hold no secret
and every request they make goes to the same /v1 routes as any client, with the key the person types
(kept in the browser's session storage). A strict Content-Security-Policy lets the page load only its own
files and talk only to this origin."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

from foundry.serve.errors import APIError

PREFIX = "/playground"
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new foundry version's page is never mixed with an old one's scripts
}


def playground_files() -> dict[str, tuple[bytes, str]]:
    """Every file of the page by its URL path under /playground/: (content, media type), read once."""
    root = resources.files("foundry.serve") / "playground"
    files: dict[str, tuple[bytes, str]] = {}

    def walk(folder, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif (suffix := "." + entry.name.rpartition(".")[2]) in _TYPES:
                files[prefix + entry.name] = (entry.read_bytes(), _TYPES[suffix])

    walk(root, "")
    return files


def add_playground(app: FastAPI) -> None:
    """GET / and /playground: the page; GET /playground/PATH: its scripts and styles (a fixed list: no paths
    are looked up on disk per request, so none can climb out of the folder)."""
    files = playground_files()
    page, _ = files["index.html"]

    async def index() -> Response:
        return Response(page, media_type=_TYPES[".html"], headers=HEADERS)

    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    app.add_api_route(PREFIX, index, methods=["GET"], include_in_schema=False)

    @app.get(PREFIX + "/{path:path}", include_in_schema=False)
    async def asset(path: str) -> Response:
        if path == "":  # /playground/
            return await index()
        if path not in files:
            raise APIError(404, f"GET {PREFIX}/{path}: the playground has no such file", "not_found")
        content, media_type = files[path]
        return Response(content, media_type=media_type, headers=HEADERS)
