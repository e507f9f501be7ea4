"""Where the API's ``.mp3`` redirect may send us.

The ``Location`` of the 307 is fetched without our credentials, but it is still a request
the pipeline makes on a server's word: it must not reach the cloud metadata service, a
database on the private network, or carry credentials in its user info. Rules:

* an absolute ``https`` URL (``http`` only when the API URL itself is ``http``), with a host
  and no user info, that :func:`urllib.parse.urlsplit` can parse (port included);
* every address the host resolves to is public, or of the same kind (loopback, private,
  link-local) as the API's own address — a simulator on loopback redirects to loopback — or
  the host is listed in ``RECARCHIVE_MEDIA_ALLOWED_HOSTS``. Reserved, multicast and
  unspecified addresses are refused unless listed.

The check resolves the name itself before the download connects, so a public name that
resolves to a private address is refused with a clear reason. A resolver that answers
differently to the download's own lookup a moment later (DNS rebinding) is caught by
:class:`GuardedResolver`, which the HTTP client's connector uses for every connection: it
applies :meth:`RedirectPolicy.check_connect` to the addresses actually connected to.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import SplitResult, urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from recarchive.errors import InvalidRedirectError, TransportError
from recarchive.redaction import strip_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]


def address_kind(address: IPAddress) -> str:
    """``"public"``, ``"loopback"``, ``"link-local"``, ``"private"`` or ``"reserved"``."""
    if isinstance(address, ipaddress.IPv6Address):
        # IPv4 carried inside IPv6 (mapped, 6to4, Teredo's client) reaches that IPv4 host.
        inner = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if inner is not None:
            address = inner
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast or address.is_unspecified or address.is_reserved:
        return "reserved"
    if address.is_global:
        return "public"
    return "private"


def _kind_of_text(address: str) -> str:
    try:
        return address_kind(ipaddress.ip_address(address.split("%", 1)[0]))
    except ValueError:
        return "reserved"


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, with every answer checked before a connection is made.

    Args:
        check: Raises ``OSError`` for ``(host, addresses)`` it refuses
            (:meth:`RedirectPolicy.check_connect`).
        inner: The resolver that does the lookups (aiohttp's default when ``None``).
    """

    def __init__(
        self, check: Callable[[str, list[str]], None], inner: AbstractResolver | None = None
    ) -> None:
        self._check = check
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host`` and refuse the answer when the check does."""
        results = await self._inner.resolve(host, port, family)
        self._check(host, [str(result["host"]) for result in results])
        return results

    async def close(self) -> None:
        """Close the inner resolver."""
        await self._inner.close()


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the event loop's resolver)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class RedirectPolicy:
    """The rules above, for one API URL.

    Args:
        api_url: The API base URL (its scheme and address decide what is allowed).
        allowed_hosts: Hosts allowed on non-public addresses (names or IP literals).
        resolve: Name resolution (injected by tests); the event loop's by default.
    """

    def __init__(
        self,
        api_url: str,
        *,
        allowed_hosts: Iterable[str] = (),
        resolve: Resolver = resolve_host,
    ) -> None:
        api = urlsplit(api_url)
        self.api_scheme = api.scheme
        self.api_host = (api.hostname or "").lower()
        self.api_port = api.port or (443 if api.scheme == "https" else 80)
        self.allowed_hosts = frozenset(host.strip().lower().strip("[]") for host in allowed_hosts)
        self._resolve = resolve
        self._api_kinds: frozenset[str] | None = None
        with contextlib.suppress(ValueError):  # an API on an address literal: kind known
            self._api_kinds = frozenset({address_kind(ipaddress.ip_address(self.api_host))})

    def check_connect(self, host: str, addresses: list[str]) -> None:
        """Refuse a connection to ``host`` at ``addresses`` that the rules do not allow.

        Called by :class:`GuardedResolver` for every name the HTTP client resolves. The API
        host is always allowed (and teaches the policy the API's address kinds); any other
        host needs public addresses, ones of the API's kinds, or a listing.

        Raises:
            OSError: The connection is refused (the transport reports a connect error).
        """
        host = host.lower().rstrip(".")
        kinds = {_kind_of_text(address) for address in addresses} or {"reserved"}
        if host == self.api_host:
            if self._api_kinds is None:
                self._api_kinds = frozenset(kinds)
            return
        if host in self.allowed_hosts:
            return
        allowed = {"public"} | set(self._api_kinds or ())
        allowed.discard("reserved")
        refused = sorted(kinds - allowed)
        if refused:
            raise OSError(f"connection to {host} refused: it resolved to a {refused[0]} address")

    def parse(self, location: str, what: str) -> SplitResult:
        """Check the ``Location`` text; return it split.

        Raises:
            InvalidRedirectError: Missing, relative, unparsable, a downgrade, or user info.
        """
        shown = strip_url(location)
        try:
            parts = urlsplit(location)
            host, _port = parts.hostname, parts.port  # .port raises on a bad port
        except ValueError as exc:
            raise InvalidRedirectError(f"{what}: unparsable redirect ({shown!r})") from exc
        if parts.scheme not in ("http", "https") or not host:
            raise InvalidRedirectError(f"{what}: redirect to a non-absolute URL ({shown!r})")
        if parts.scheme == "http" and self.api_scheme != "http":
            raise InvalidRedirectError(f"{what}: redirect downgrades https to http ({shown!r})")
        if "@" in parts.netloc:
            raise InvalidRedirectError(f"{what}: redirect carries user info ({shown!r})")
        if any(ord(char) < 0x21 or ord(char) == 0x7F for char in location):
            raise InvalidRedirectError(f"{what}: redirect holds control characters ({shown!r})")
        return parts

    async def check_target(self, parts: SplitResult, what: str) -> None:
        """Refuse a host on a non-public address that neither the API's kind nor the list allows.

        Raises:
            InvalidRedirectError: The target is not allowed.
            TransportError: The host name does not resolve (may be transient).
        """
        host = (parts.hostname or "").lower()
        if host in self.allowed_hosts:
            return
        port = parts.port or (443 if parts.scheme == "https" else 80)
        kinds = await self._kinds_of(host, port, what)
        allowed = {"public"} | await self._api_address_kinds()
        allowed.discard("reserved")
        refused = sorted(kinds - allowed)
        if refused:
            raise InvalidRedirectError(
                f"{what}: redirect to a {', '.join(refused)} address ({host}) refused; list the "
                "host in RECARCHIVE_MEDIA_ALLOWED_HOSTS if it is yours"
            )

    async def _kinds_of(self, host: str, port: int, what: str) -> set[str]:
        try:
            return {address_kind(ipaddress.ip_address(host))}
        except ValueError:
            pass
        try:
            addresses = await self._resolve(host, port)
        except OSError as exc:
            raise TransportError(f"{what}: cannot resolve {host} ({type(exc).__name__})") from exc
        return {_kind_of_text(address) for address in addresses} or {"reserved"}

    async def _api_address_kinds(self) -> frozenset[str]:
        if self._api_kinds is None:
            try:
                kinds = await self._kinds_of(self.api_host, self.api_port, "API host")
            except TransportError:
                kinds = {"public"}  # cannot tell: allow nothing beyond public addresses
            self._api_kinds = frozenset(kinds)
        return self._api_kinds
