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
        for name, value in headers:
            if name == b"host":
                host = _hostname(value.decode("latin-1").strip().lower())
                if host in self.exact or (self.suffixes and ("." + host).endswith(self.suffixes)):
                    return None
                return InvalidHost("this server does not answer to that Host name: add it to NEUROSERVE_ALLOWED_HOSTS")
        return InvalidHost("the request has no Host header")


def _hostname(host: str) -> str:
    """The name of a Host header without its port ("[::1]:8000" -> "::1")."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, _, _ = host.partition(":") if host.count(":") == 1 else (host, "", "")
    return name.rstrip(".")
