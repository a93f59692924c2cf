"""Content Credentials with real c2pa signing and reading: development certificates made here."""

import datetime
import io
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image

from shared.content_credentials import (
    ASSERTION_LABEL,
    TRAINED_ALGORITHMIC_MEDIA,
    Claims,
    CredentialsError,
    CredentialSigner,
    Ingredient,
    SigningError,
    make_development_credentials,
    read_manifest,
    sha256_hex,
)
from worker.encoding import encode_image, read_parameters

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PARAMETERS = "a red fox in snow\nSteps: 25, Sampler: DPM++ 2M Karras, Seed: 7"


def claims(**overrides: object) -> Claims:
    fields: dict = {
        "generator": "txt2img-service",
        "generator_version": "1.4.0",
        "model_id": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "model_sha256": "5f" * 32,
        "loras": (("pixel-art", 0.8), ("film-grain", 0.25)),
        "controlnets": ("canny",),
        "job_id": "job-7f3a",
        "image_index": 2,
        "watermark": "dwt-dct:0x1a2b3c4d5e6f",
        "prompt": None,
        "negative_prompt": None,
        "ingredients": (
            Ingredient("init_image", "ab" * 32, "image/png"),
            Ingredient("control:canny", "cd" * 32, "image/jpeg"),
        ),
        "development_signer": True,
    }
    return Claims(**(fields | overrides))


def picture(output_format: str, size: int = 48, compress_level: int = 1) -> bytes:
    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    return encode_image(image, output_format, PARAMETERS, png_compress_level=compress_level)


@pytest.fixture(scope="module")
def dev_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_development_credentials(tmp_path_factory.mktemp("c2pa"))


@pytest.fixture(scope="module")
def signer(dev_files: tuple[Path, Path]) -> CredentialSigner:
    return CredentialSigner.from_files(*dev_files)


def test_development_credentials_are_accepted_and_made_once(tmp_path: Path) -> None:
    chain_path, key_path = make_development_credentials(tmp_path)
    assert (chain_path.name, key_path.name) == ("c2pa-dev-chain.pem", "c2pa-dev-key.pem")
    assert key_path.stat().st_mode & 0o777 == 0o600
    leaf, ca = x509.load_pem_x509_certificates(chain_path.read_bytes())
    assert (
        leaf.issuer == ca.subject
        and not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    )
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert (
        ExtendedKeyUsageOID.EMAIL_PROTECTION
        in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc > datetime.timedelta(days=700)
    before = (chain_path.read_bytes(), key_path.read_bytes())

    assert make_development_credentials(tmp_path) == (chain_path, key_path)
    assert (chain_path.read_bytes(), key_path.read_bytes()) == before
    assert CredentialSigner.from_files(chain_path, key_path).development


def test_racing_makers_write_one_pair(tmp_path: Path) -> None:
    barrier = threading.Barrier(4)

    def make() -> tuple[Path, Path]:
        barrier.wait()
        return make_development_credentials(tmp_path / "race")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: make(), range(4)))
    assert len(set(results)) == 1
    CredentialSigner.from_files(*results[0])
    assert not [name for name in os.listdir(tmp_path / "race") if name.endswith(".tmp")]


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_a_signed_image_keeps_its_pixels_and_parameters_and_verifies(
    signer: CredentialSigner, output_format: str
) -> None:
    original = picture(output_format)
    content_type = CONTENT_TYPES[output_format]
    signed = signer.sign(original, content_type, claims())

    assert read_parameters(signed) == PARAMETERS
    assert Image.open(io.BytesIO(signed)).tobytes() == Image.open(io.BytesIO(original)).tobytes()
    for given in (content_type, None):
        report = read_manifest(signed, given)
        assert report.present and report.valid, report
        assert report.validation_state == "Valid"
        assert report.failures == ("signingCredential.untrusted",)
        assert report.development_signer
        assert report.signer == "txt2img-service development signer"
        assert report.claim_generator == "txt2img-service/1.4.0"
    found = report.claims
    assert found["digital_source_type"] == TRAINED_ALGORITHMIC_MEDIA
    assert found["software_agent"] == {"name": "txt2img-service", "version": "1.4.0"}
    assert found["model_id"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert found["model_sha256"] == "5f" * 32
    assert found["loras"] == [
        {"name": "pixel-art", "scale": 0.8},
        {"name": "film-grain", "scale": 0.25},
    ]
    assert found["controlnets"] == ["canny"]
    assert (found["job_id"], found["image_index"]) == ("job-7f3a", 2)
    assert found["watermark"] == "dwt-dct:0x1a2b3c4d5e6f"
    assert found["development_signer"] is True
    assert found["ingredients"] == [
        {"role": "init_image", "sha256": "ab" * 32, "content_type": "image/png"},
        {"role": "control:canny", "sha256": "cd" * 32, "content_type": "image/jpeg"},
    ]
    assert found["c2pa_ingredients"] == [
        {
            "title": "init_image",
            "format": "image/png",
            "relationship": "inputTo",
            "sha256": "ab" * 32,
        },
        {
            "title": "control:canny",
            "format": "image/jpeg",
            "relationship": "inputTo",
            "sha256": "cd" * 32,
        },
    ]
    assert "prompt" not in found and "negative_prompt" not in found


def test_the_prompt_is_signed_only_when_given(signer: CredentialSigner) -> None:
    def manifest_chunk(signed: bytes) -> bytes:
        [body] = [body for _, kind, body in _chunks(signed) if kind == b"caBX"]
        return body

    unsaid = signer.sign(picture("png"), "image/png", claims())
    assert b"red fox" not in manifest_chunk(unsaid)
    said = signer.sign(
        picture("png"), "image/png", claims(prompt="a red fox", negative_prompt="blurry")
    )
    assert b"red fox" in manifest_chunk(said)
    found = read_manifest(said).claims
    assert (found["prompt"], found["negative_prompt"]) == ("a red fox", "blurry")


def test_a_text_to_image_manifest_has_no_ingredients(signer: CredentialSigner) -> None:
    report = read_manifest(signer.sign(picture("png"), "image/png", claims(ingredients=())))
    assert report.valid and report.claims["ingredients"] == []
    assert report.claims["c2pa_ingredients"] == []


def _chunks(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(offset, type, body) of each PNG chunk."""
    found, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        found.append((at, data[at + 4 : at + 8], data[at + 8 : at + 8 + length]))
        at += 12 + length
    return found


def test_one_changed_pixel_of_a_signed_png_fails_the_hash(signer: CredentialSigner) -> None:
    # Stored (uncompressed) deflate blocks: the changed IDAT keeps its length and the manifest
    # its place; the stream's Adler-32 and the chunk's CRC are recomputed so the file decodes.
    signed = signer.sign(picture("png", size=16, compress_level=0), "image/png", claims())
    assert ASSERTION_LABEL.encode() in signed
    [(at, _, body)] = [chunk for chunk in _chunks(signed) if chunk[1] == b"IDAT"]
    raw = bytearray(zlib.decompress(body))
    # The last byte: the blue of the last pixel. Rows are filtered (predicted from the bytes
    # before), so a byte earlier on would change the pixels after it as well.
    raw[-1] ^= 0x40
    new_body = zlib.compress(bytes(raw), 0)
    assert len(new_body) == len(body)
    chunk = b"IDAT" + new_body
    tampered = (
        signed[: at + 4]
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + signed[at + 12 + len(body) :]
    )
    before = Image.open(io.BytesIO(signed)).tobytes()
    after = Image.open(io.BytesIO(tampered)).tobytes()
    assert sum(a != b for a, b in zip(before, after, strict=True)) == 1

    report = read_manifest(tampered)
    assert report.present and not report.valid
    assert report.validation_state == "Invalid"
    assert "assertion.dataHash.mismatch" in report.failures
    assert report.claims["job_id"] == "job-7f3a"


def test_a_changed_jpeg_scan_byte_fails_the_hash(signer: CredentialSigner) -> None:
    signed = bytearray(signer.sign(picture("jpeg", size=64), "image/jpeg", claims()))
    # Walk the segments (the manifest's bytes may hold an FF DA of their own) to the scan.
    at = 2
    while signed[at : at + 2] != b"\xff\xda":
        at += 2 + struct.unpack(">H", signed[at + 2 : at + 4])[0]
    scan = at + 2 + struct.unpack(">H", signed[at + 2 : at + 4])[0]
    at = next(n for n in range(scan + 40, len(signed)) if 0xFF not in signed[n - 1 : n + 2])
    signed[at] ^= 0x01
    report = read_manifest(bytes(signed), "image/jpeg")
    assert report.present and not report.valid
    assert "assertion.dataHash.mismatch" in report.failures


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_an_unsigned_image_has_no_manifest(output_format: str) -> None:
    report = read_manifest(picture(output_format))
    assert not report.present and not report.valid and report.failures == ()


@pytest.mark.parametrize(
    "data", [b"", b"not an image at all" * 20, b"\x89PNG\r\n\x1a\n" + b"\0" * 40]
)
def test_garbage_has_no_manifest_and_does_not_raise(data: bytes) -> None:
    report = read_manifest(data)
    assert not report.present and not report.valid


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_a_key_of_another_chain_is_refused(dev_files: tuple[Path, Path], tmp_path: Path) -> None:
    _, other_key = make_development_credentials(tmp_path)
    with pytest.raises(CredentialsError, match="T2I_C2PA_KEY is not the key of T2I_C2PA_CERT"):
        CredentialSigner.from_pem(dev_files[0].read_bytes(), other_key.read_bytes())


def test_a_self_signed_leaf_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "me")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(CredentialsError, match=r"T2I_C2PA_CERT: .* is self-signed"):
        CredentialSigner.from_pem(_pem(cert), _key_pem(key))


def test_a_leaf_without_an_accepted_key_usage_is_refused(dev_files: tuple[Path, Path]) -> None:
    leaf, ca = x509.load_pem_x509_certificates(dev_files[0].read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    # Issued by a CA whose key we do not hold is fine here: the usage check comes first.
    cert = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(CredentialsError, match="T2I_C2PA_CERT"):
        CredentialSigner.from_pem(_pem(cert), _key_pem(key))


def test_missing_or_unreadable_files_name_the_setting(
    dev_files: tuple[Path, Path], tmp_path: Path
) -> None:
    chain_path, key_path = dev_files
    with pytest.raises(CredentialsError, match=r"T2I_C2PA_CERT: cannot read .*nope\.pem"):
        CredentialSigner.from_files(tmp_path / "nope.pem", key_path)
    with pytest.raises(CredentialsError, match=r"T2I_C2PA_KEY: cannot read .*nope\.pem"):
        CredentialSigner.from_files(chain_path, tmp_path / "nope.pem")
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(CredentialsError, match="T2I_C2PA_CERT holds no PEM certificate"):
        CredentialSigner.from_files(tmp_path / "junk.pem", key_path)
    with pytest.raises(CredentialsError, match="T2I_C2PA_KEY holds no unencrypted PEM"):
        CredentialSigner.from_files(chain_path, tmp_path / "junk.pem")


def test_four_threads_sign_at_once(signer: CredentialSigner) -> None:
    barrier = threading.Barrier(4)
    images = {fmt: picture(fmt, size=64) for fmt in ("png", "jpeg", "webp")}

    def sign(n: int) -> tuple[int, bytes]:
        barrier.wait()
        fmt = ("png", "jpeg", "webp", "png")[n]
        results = [
            signer.sign(images[fmt], CONTENT_TYPES[fmt], claims(job_id=f"job-{n}", image_index=i))
            for i in range(5)
        ]
        return n, results[-1]

    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(sign, range(4)))
    for n, signed in done:
        report = read_manifest(signed)
        assert report.valid, report
        assert (report.claims["job_id"], report.claims["image_index"]) == (f"job-{n}", 4)


def test_bytes_that_are_not_the_image_they_claim_are_not_signed(signer: CredentialSigner) -> None:
    with pytest.raises(SigningError, match="image/png"):
        signer.sign(b"not a png" * 10, "image/png", claims())
    with pytest.raises(SigningError, match="image/gif"):
        signer.sign(b"GIF89a", "image/gif", claims())


def test_sha256_hex_is_the_ingredient_hash() -> None:
    assert sha256_hex(b"abc").startswith("ba7816bf")
