"""Where a media redirect may go: pure checks with an injected resolver (no traffic at all)."""

from __future__ import annotations

import pytest

from recarchive.bird.redirect import RedirectPolicy, address_kind
from recarchive.errors import InvalidRedirectError, TransportError

DNS = {
    "media.api.bird.com": ["52.95.110.1"],
    "rebind.example": ["52.95.110.1", "10.0.0.7"],
    "meta.example": ["169.254.169.254"],
    "lan.example": ["192.168.1.20"],
    "v6local.example": ["fe80::1%eth0"],
    "loop.example": ["127.0.0.1"],
    "api.bird.com": ["52.95.110.2"],
    "sim.internal": ["10.1.1.1"],
}


async def resolve(host: str, port: int) -> list[str]:
    if host not in DNS:
        raise OSError("no such host")
    return DNS[host]


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("::ffff:169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("192.168.0.1", "private"),
        ("100.64.0.1", "private"),
        ("fd00::1", "private"),
        ("0.0.0.0", "reserved"),
        ("224.0.0.1", "reserved"),
        ("52.95.110.1", "public"),
        ("2606:4700::1111", "public"),
    ],
    ids=lambda value: str(value),
)
def test_address_kinds(address: str, kind: str) -> None:
    import ipaddress

    assert address_kind(ipaddress.ip_address(address)) == kind


PUBLIC_API = "https://api.bird.com"

CASES = [
    # (id, api_url, location, allowed_hosts, refused_with or None)
    ("public-https", PUBLIC_API, "https://media.api.bird.com/r/1.mp3?X-Amz-Signature=s", (), None),
    ("downgrade", PUBLIC_API, "http://media.api.bird.com/r/1.mp3", (), "downgrades"),
    ("userinfo", PUBLIC_API, "https://u:p@media.api.bird.com/r", (), "user info"),
    ("userinfo-empty", PUBLIC_API, "https://@media.api.bird.com/r", (), "user info"),
    ("unparsable-ipv6", PUBLIC_API, "https://[bad", (), "unparsable"),
    ("bad-port", PUBLIC_API, "https://media.api.bird.com:99999/r", (), "unparsable"),
    ("relative", PUBLIC_API, "/r/1.mp3", (), "non-absolute"),
    ("scheme-ftp", PUBLIC_API, "ftp://media.api.bird.com/r", (), "non-absolute"),
    ("scheme-file", PUBLIC_API, "file:///etc/passwd", (), "non-absolute"),
    ("empty", PUBLIC_API, "", (), "non-absolute"),
    ("control-char", PUBLIC_API, "https://media.api.bird.com/r\r\nX: y", (), "control"),
    ("literal-link-local", PUBLIC_API, "https://169.254.169.254/latest", (), "link-local"),
    ("literal-loopback", PUBLIC_API, "https://127.0.0.1:8080/x", (), "loopback"),
    ("literal-private", PUBLIC_API, "https://10.0.0.1/x", (), "private"),
    ("literal-v6-mapped", PUBLIC_API, "https://[::ffff:169.254.169.254]/x", (), "link-local"),
    ("name-to-link-local", PUBLIC_API, "https://meta.example/x", (), "link-local"),
    ("name-to-lan", PUBLIC_API, "https://lan.example/x", (), "private"),
    ("name-to-v6-link-local", PUBLIC_API, "https://v6local.example/x", (), "link-local"),
    ("one-of-several-private", PUBLIC_API, "https://rebind.example/x", (), "private"),
    ("listed-host", PUBLIC_API, "https://lan.example/x", ("LAN.example",), None),
    ("listed-literal", PUBLIC_API, "https://[fe80::1]/x", ("fe80::1",), None),
    ("loopback-api-to-loopback", "http://127.0.0.1:8787", "http://127.0.0.1:8788/m", (), None),
    ("loopback-api-to-name-on-loopback", "http://127.0.0.1:1", "http://loop.example/m", (), None),
    (
        "loopback-api-to-link-local",
        "http://127.0.0.1:1",
        "http://169.254.169.254/",
        (),
        "link-local",
    ),
    ("loopback-api-to-private", "http://127.0.0.1:1", "http://10.0.0.1/", (), "private"),
    ("private-api-to-private", "http://sim.internal", "http://10.9.9.9/m", (), None),
    ("private-api-to-link-local", "http://sim.internal", "http://169.254.1.1/", (), "link-local"),
    ("http-api-allows-http", "http://127.0.0.1:1", "http://127.0.0.1:2/m", (), None),
    ("reserved-never", "http://127.0.0.1:1", "http://0.0.0.0/m", (), "reserved"),
]


@pytest.mark.parametrize(
    ("api_url", "location", "allowed", "refused"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_redirect_policy(
    api_url: str, location: str, allowed: tuple[str, ...], refused: str | None
) -> None:
    policy = RedirectPolicy(api_url, allowed_hosts=allowed, resolve=resolve)
    if refused is None:
        await policy.check_target(policy.parse(location, "media of r"), "media of r")
        return
    with pytest.raises(InvalidRedirectError, match=refused) as caught:
        await policy.check_target(policy.parse(location, "media of r"), "media of r")
    assert "X-Amz-Signature" not in str(caught.value) and ":p@" not in str(caught.value)


async def test_an_unresolvable_host_is_a_transport_error_to_retry() -> None:
    policy = RedirectPolicy(PUBLIC_API, resolve=resolve)
    with pytest.raises(TransportError, match="cannot resolve"):
        await policy.check_target(policy.parse("https://nowhere.example/x", "m"), "m")
