"""Cross-site request forgery protection by the rules of Go's ``http.CrossOriginProtection``
(Go 1.25, after Filippo Valsorda's "CSRF" note): no tokens, since every modern browser says where a
request comes from.

CORS alone does not stop a page on another origin from *sending* a request: a form, a
``text/plain`` or ``multipart/form-data`` POST goes out with no preflight, and the server acts on it
even though the page cannot read the answer (a hostile page enrolled a face in the gallery that
way). So a state-changing request (not GET, HEAD or OPTIONS) from a browser is refused unless

- ``Sec-Fetch-Site`` says ``same-origin`` or ``none`` (typed in the address bar, a bookmark), or
- its ``Origin`` is one the CORS settings allow (``*`` allows every origin), or
- with no ``Sec-Fetch-Site`` (browsers before 2020-2023), ``Origin`` names this server's own host.

A request with neither header is not from a browser (curl, SDKs, mobile apps) and passes: no
ambient cookie rides on it, and API keys go in headers that a forged request cannot set."""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from service.api.handlers import error_body
from service.errors import CrossOriginRefused, InvalidHost

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class CrossOriginPolicy:
    def __init__(self, trusted_origins: list[str]) -> None:
        self.any_origin = "*" in trusted_origins
        self.trusted = frozenset(o.rstrip("/").lower() for o in trusted_origins)

    def refusal(self, method: str, headers: list[tuple[bytes, bytes]]) -> CrossOriginRefused | None:
        if method in _SAFE_METHODS or self.any_origin:
            return None
        site = origin = host = None
        for name, value in headers:
            if name == b"sec-fetch-site":
                site = value.decode("latin-1").strip().lower()
            elif name == b"origin":
                origin = value.decode("latin-1").strip()
            elif name == b"host":
                host = value.decode("latin-1").strip().lower()
        if origin is not None and origin.rstrip("/").lower() in self.trusted:
            return None
        if site is not None:
            if site in ("same-origin", "none"):
                return None
            return CrossOriginRefused(
                f"a cross-site {method} (Sec-Fetch-Site: {site}) from an origin not in NEUROSERVE_CORS_ALLOW_ORIGINS"
            )
        if origin is None:
            return None
        try:
            same_host = urlsplit(origin).netloc.lower() == host
        except ValueError:
            same_host = False
        if same_host:
            return None
        return CrossOriginRefused(f"a cross-origin {method} from an origin not in NEUROSERVE_CORS_ALLOW_ORIGINS")


LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1"]


class HostAllowlist:
    """The Host header checked against the names a server answers to (Django's ALLOWED_HOSTS, Vite's
    allowedHosts). A server on loopback with no keys is otherwise open to any web page by DNS
    rebinding: the attacker's name resolves to 127.0.0.1, the page is then "same-origin" with it,
    and both the browser's CORS and the cross-origin check above let it read every answer. Names
    match with any port; ".example.com" also matches its subdomains."""

    def __init__(self, names: list[str]) -> None:
        names = [n.strip().lower().rstrip(".") for n in names if n.strip()]
        self.exact = frozenset(n.strip("[]") for n in names if not n.startswith("."))
        self.suffixes = tuple(n for n in names if n.startswith("."))

    def refusal(self, headers: list[tuple[bytes, bytes]]) -> InvalidHost | None:
        hosts = [value for name, value in headers if name == b"host"]
        if not hosts:
            return InvalidHost("the request has no Host header")
        if len(hosts) > 1:  # which one a proxy routed by is anyone's guess (RFC 9112, 3.2: 400)
            return InvalidHost("the request has more than one Host header")
        host, port = _host_and_port(hosts[0].decode("latin-1").strip().lower())
        if port and not (port.isascii() and port.isdigit()):
            return InvalidHost("the Host header's port is not a number")
        if host in self.exact or (self.suffixes and ("." + host).endswith(self.suffixes)):
            return None
        return InvalidHost("this server does not answer to that Host name: add it to NEUROSERVE_ALLOWED_HOSTS")


def _host_and_port(host: str) -> tuple[str, str]:
    """The name of a Host header without its port, and the port ("[::1]:8000" -> "::1", "8000")."""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return host, ""
        return host[1:end], host[end + 2 :] if host[end + 1 : end + 2] == ":" else host[end + 1 :]
    name, _, port = host.partition(":") if host.count(":") == 1 else (host, "", "")
    return name.rstrip("."), port


class CorsMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in the service's wire shape (403
    ``cross_origin_refused``; OpenAI's on the OpenAI routes) instead of a text/plain 400 "Disallowed
    CORS origin", and every preflight answer carrying ``X-Request-ID`` as every other answer does
    (a preflight never reaches the request guard that sets it)."""

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            headers = Headers(scope=scope)
            if headers.get("origin") is not None and "access-control-request-method" in headers:
                from service.api.middleware import _request_id  # it imports this module

                response = self._preflight(headers, scope["path"])
                response.headers["x-request-id"] = _request_id(scope)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _preflight(self, request_headers: Headers, path: str) -> Response:
        response = self.preflight_response(request_headers)
        if response.status_code < 400:
            return response
        refused = bytes(response.body).decode("latin-1").removeprefix("Disallowed CORS ").split(", ")
        reasons = []
        if "origin" in refused:
            reasons.append("its origin is not in NEUROSERVE_CORS_ALLOW_ORIGINS")
        if "method" in refused:
            reasons.append(f"this API answers only {', '.join(sorted(set(self.allow_methods)))}")
        if "headers" in refused:
            reasons.append(f"its headers are not among {', '.join(sorted(set(self.allow_headers)))}")
        error = CrossOriginRefused(f"CORS preflight refused: {'; '.join(reasons) or ', '.join(refused)}")
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        return JSONResponse(error_body(error, path), status_code=error.status_code, headers=headers)
