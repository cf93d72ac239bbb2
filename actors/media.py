"""Safe image fetching and decoding: data URLs, allow-listed local files, SSRF-checked http(s).

Runs in the image preprocessor stage before models.image_processing; every refusal is a
MediaError, which the HTTP layer returns to the client as a 400.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from urllib.parse import SplitResult, unquote, unquote_to_bytes, urljoin, urlsplit

import httpx
from PIL import (  # noqa: F401 (registers the decoders named in IMAGE_FORMATS)
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from models.image_processing import to_rgb

METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# Allow-list of decoders: no EPS (Ghostscript) or other rare, riskier plugins. JPEG covers MPO.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class MediaError(ValueError):
    """An image that cannot be used; the message names the problem (HTTP 400)."""


@dataclass
class MediaPolicy:
    allowed_local_media_path: str | None = None
    allowed_media_domains: list[str] = field(default_factory=list)
    max_bytes: int = 20 << 20
    max_pixels: int = 64_000_000
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    max_redirects: int = 3


def content_hash(image: Image.Image) -> str:
    """sha256 of mode, size and decoded pixels: equal for lossless re-encodes of one picture."""
    h = hashlib.sha256(f"{image.mode}|{image.width}x{image.height}|".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> upright RGB image; the pixel count is checked from the header before decoding."""
    # Pillow's messages quote its objects (`<_io.BytesIO object at 0x...>`): never passed on.
    try:
        image: Image.Image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise MediaError(f"image has too many pixels (more than {max_pixels})") from e
    except Exception as e:  # pillow raises many types for garbage input
        raise MediaError(
            f"cannot decode image: not a {', '.join(IMAGE_FORMATS)} image, or damaged"
        ) from e
    width, height = image.size
    if width * height > max_pixels:
        raise MediaError(f"image has {width}x{height} pixels, more than the limit of {max_pixels}")
    if width <= 0 or height <= 0:
        raise MediaError(f"cannot decode image: empty size {width}x{height}")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except Exception as e:
        raise MediaError(
            f"cannot decode image: the {image.format or 'image'} data is damaged"
        ) from e


async def load_image(source: str, policy: MediaPolicy) -> tuple[Image.Image, bytes]:
    """An image_url string (data:, http(s)://, file://, absolute path) -> (RGB image, raw bytes)."""
    source = source.strip()
    scheme = source.split(":", 1)[0].lower() if ":" in source else ""
    if scheme == "data":
        data = _decode_data_url(source, policy.max_bytes)
    elif scheme in ("http", "https"):
        data = await _fetch_remote(source, policy)
    elif scheme == "file" or source.startswith("/"):
        data = await asyncio.to_thread(_read_local, source, policy)
    else:
        raise MediaError(
            f"unsupported image source {source[:64]!r}: use data:, http(s):// or file://"
        )
    image = await asyncio.to_thread(decode_image, data, policy.max_pixels)
    return image, data


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("invalid data URL: missing ','")
    if header.lower().endswith(";base64"):
        text = "".join(unquote(payload).split())
        if len(text) * 3 // 4 > max_bytes + 3:
            raise MediaError(f"image exceeds {max_bytes} bytes")
        try:
            data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError("invalid base64 image data") from e
    else:
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise MediaError(f"image exceeds {max_bytes} bytes")
    return data


def _read_local(source: str, policy: MediaPolicy) -> bytes:
    if policy.allowed_local_media_path is None:
        raise MediaError(
            "local files are not allowed; start the server with --allowed-local-media-path"
        )
    if source.lower().startswith("file:"):
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise MediaError(f"file URL must not name a host: {parts.netloc!r}")
        path = unquote(parts.path)
    else:
        path = source
    if not os.path.isabs(path):
        raise MediaError(f"local image path must be absolute: {path!r}")
    root = os.path.realpath(policy.allowed_local_media_path)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise MediaError(f"{path} is outside the allowed media path")
    if not os.path.isfile(real):  # also keeps us from opening a FIFO or a device
        raise MediaError(f"{path} is not a readable regular file")
    try:
        with open(real, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except OSError as e:
        raise MediaError(f"cannot read local image {path}: {e.strerror or e}") from e
    if len(data) > policy.max_bytes:
        raise MediaError(f"image exceeds {policy.max_bytes} bytes")
    return data


def address_allowed(ip: IPAddress, host_allowlisted: bool) -> bool:
    """Allow-list: only global unicast addresses, unless the host itself is allow-listed."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES or ip.is_unspecified or ip.is_multicast:
        return False
    if host_allowlisted:
        return True
    return ip.is_global and not (
        ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_reserved
    )


async def _vetted_addresses(host: str, port: int, policy: MediaPolicy) -> list[IPAddress]:
    """Resolve host; refuse if it is not allow-listed or if ANY address is not allowed."""
    allowlist = {d.lower().rstrip(".") for d in policy.allowed_media_domains}
    allowlisted = host in allowlist
    if allowlist and not allowlisted:
        raise MediaError(f"image host {host!r} is not in --allowed-media-domains")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise MediaError(f"cannot resolve image host {host!r}: {e}") from e
    addresses = list(
        dict.fromkeys(ipaddress.ip_address(str(i[4][0]).split("%", 1)[0]) for i in infos)
    )
    if not addresses:
        raise MediaError(f"cannot resolve image host {host!r}")
    for ip in addresses:
        if not address_allowed(ip, allowlisted):
            raise MediaError(f"image host {host!r} resolves to a disallowed address {ip}")
    return addresses


async def _fetch_remote(url: str, policy: MediaPolicy) -> bytes:
    timeout = httpx.Timeout(
        connect=policy.connect_timeout_s,
        read=policy.read_timeout_s,
        write=policy.read_timeout_s,
        pool=policy.connect_timeout_s,
    )
    # trust_env=False: no proxies from the environment, so we connect to the vetted address.
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as c:
        for _ in range(policy.max_redirects + 1):
            try:
                result = await asyncio.wait_for(
                    _fetch_once(c, url, policy),
                    policy.connect_timeout_s + policy.read_timeout_s,
                )
            except (httpx.TimeoutException, asyncio.TimeoutError) as e:  # noqa: UP041 (py3.10)
                raise MediaError(f"timed out fetching image from {_short(url)}") from e
            except httpx.HTTPError as e:
                raise MediaError(f"cannot fetch image from {_short(url)}: {e}") from e
            if isinstance(result, bytes):
                return result
            url = result
    raise MediaError(f"too many redirects fetching image (limit {policy.max_redirects})")


async def _fetch_once(client: httpx.AsyncClient, url: str, policy: MediaPolicy) -> bytes | str:
    """One GET to the vetted address; returns the body, or the next URL on a redirect."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise MediaError(f"image URL scheme must be http or https, got {parts.scheme!r}")
    if parts.username is not None or parts.password is not None:
        raise MediaError("credentials in image URLs are not allowed")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise MediaError(f"image URL has no host: {_short(url)}")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as e:
        raise MediaError(f"invalid port in image URL: {_short(url)}") from e
    addresses = await _vetted_addresses(host, port, policy)
    response = await _send_pinned(client, parts, host, port, addresses)
    try:
        if response.status_code in REDIRECT_CODES and "location" in response.headers:
            return urljoin(url, response.headers["location"])
        if not 200 <= response.status_code < 300:
            raise MediaError(
                f"fetching image from {_short(url)} failed: HTTP {response.status_code}"
            )
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > policy.max_bytes:
            raise MediaError(f"image exceeds {policy.max_bytes} bytes")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > policy.max_bytes:
                raise MediaError(f"image exceeds {policy.max_bytes} bytes")
        return bytes(body)
    finally:
        await response.aclose()


async def _send_pinned(
    client: httpx.AsyncClient,
    parts: SplitResult,
    host: str,
    port: int,
    addresses: list[IPAddress],
) -> httpx.Response:
    """Connect to the addresses just vetted, in order (no second DNS lookup, so no rebinding);
    the Host header and TLS SNI / certificate check keep the original name."""
    headers = {
        "Host": parts.netloc.rsplit("@", 1)[-1],
        "Accept": "image/*",
        "Accept-Encoding": "identity",
    }
    for i, ip in enumerate(addresses):
        literal = f"[{ip}]" if ip.version == 6 else str(ip)
        pinned = parts._replace(netloc=f"{literal}:{port}").geturl()
        request = client.build_request(
            "GET", pinned, headers=headers, extensions={"sni_hostname": host}
        )
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError:
            if i == len(addresses) - 1:
                raise
    raise MediaError(f"cannot resolve image host {host!r}")


def _short(url: str) -> str:
    return url if len(url) <= 100 else url[:97] + "..."
