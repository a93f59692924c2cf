"""The SSRF guard judges an IPv6 address that carries IPv4 addresses by every one it carries."""

import asyncio
import ipaddress

import pytest

from api.images import BadImage, ImageFetches, _fetch
from shared.settings import ApiSettings, WebhookSettings
from shared.webhooks import WebhookRefused, check_webhook_url

SETTINGS = WebhookSettings(env="development", webhook_allowlist="")


@pytest.mark.parametrize(
    "address",
    [
        # Teredo, 2001::/32: the server is bits 32-63, the client the last 32 bits inverted.
        "2001::7f00:1",  # server 0.0.0.0, client public
        "2001:0:7f00:1:0:0:f7f7:f7f7",  # server 127.0.0.1, client 8.8.8.8
        "2001:0:a00:1:0:0:f7f7:f7f7",  # server 10.0.0.1
        "2001:0:a9fe:a9fe:0:0:f7f7:f7f7",  # server 169.254.169.254
        "2001:0:808:808:0:0:80ff:fffe",  # client 127.0.0.1
        "2001:0:808:808:0:0:5601:5601",  # client 169.254.169.254
        "2001:0:808:808:0:0:3f57:fdfe",  # client 192.168.2.1
        # 6to4, 2002::/16: the router's IPv4 address is bits 16-47.
        "2002:7f00:1::1",
        "2002:a9fe:a9fe::1",
        "2002:c0a8:101::1",
        # IPv4-mapped, and the deprecated IPv4-compatible form (refused whatever it carries).
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::127.0.0.1",
        "::10.0.0.1",
        "::8.8.8.8",
        # NAT64: the well-known prefix, and the local-use one (RFC 8215), which is not public.
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b::c0a8:101",
        "64:ff9b:1::808:808",
    ],
)
def test_an_address_carrying_a_non_public_ipv4_address_is_refused(address: str) -> None:
    with pytest.raises(WebhookRefused, match="address"):
        check_webhook_url(f"http://[{address}]/hook", SETTINGS)


@pytest.mark.parametrize(
    "address",
    [
        "2606:4700:4700::1111",
        "2001:0:808:808:0:0:fefe:fefe",  # Teredo: server 8.8.8.8, client 1.1.1.1
        "2002:808:808::1",  # 6to4 through 8.8.8.8
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
    ],
)
def test_a_public_address_in_any_form_is_accepted(address: str) -> None:
    target = check_webhook_url(f"http://[{address}]:8080/hook", SETTINGS)
    assert [ipaddress.ip_address(text) for text in target.addresses] == [
        ipaddress.ip_address(address)
    ]


def test_an_input_image_url_goes_through_the_same_guard() -> None:
    fetches = ImageFetches(at_once=1, per_key=1)
    with pytest.raises(BadImage, match="embedded in 2001::7f00:1") as refused:
        asyncio.run(_fetch("http://[2001::7f00:1]/cat.png", ApiSettings(), SETTINGS, fetches))
    assert refused.value.kind == "image_url_refused"
