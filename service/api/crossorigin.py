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

from service.errors import CrossOriginRefused

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
