"""Content Credentials: sign a C2PA manifest into an image, and read one back.

The only module that knows c2pa. The manifest of each image holds:

- `c2pa.actions.v2`: one `c2pa.created` action, `digitalSourceType` IPTC's
  `trainedAlgorithmicMedia`, `softwareAgent` the generator and its version, and (when there were
  input images) `parameters.ingredients` pointing at the ingredient assertions;
- a claim generator info (the generator's name and version; c2pa adds its own);
- `org.txt2img-service.generation` (`ASSERTION_LABEL`): model, weights hash, LoRAs, ControlNets,
  job, image index, watermark, whether a development certificate signed it, the input images
  (role, sha256, content type) and, only when given, the prompts;
- one `c2pa.ingredient.v3` per input image, relationship `inputTo`, titled by its role, its
  sha256 in the ingredient's metadata. c2pa binds an ingredient to its bytes only when it is
  given them (a stream), which the signer does not have: so the hash is recorded as data, in the
  ingredient and in our assertion, where our reader takes it from.

No thumbnail: it would add tens of kilobytes per image for a picture of the picture itself.
"""

import contextlib
import datetime
import fcntl
import hashlib
import io
import itertools
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import c2pa
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ASSERTION_LABEL = "org.txt2img-service.generation"
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
DEVELOPMENT_MARKER = "txt2img-service development signer"
DEV_CHAIN_NAME = "c2pa-dev-chain.pem"
DEV_KEY_NAME = "c2pa-dev-key.pem"
CERT_SETTING = "T2I_C2PA_CERT"
KEY_SETTING = "T2I_C2PA_KEY"

# Failure codes about trust in the signer, not about the image: without a trust list that holds
# our CA (development, or no list configured) every signer is untrusted.
TRUST_ONLY_CODES = frozenset({"signingCredential.untrusted"})
# The extended key usages c2pa 0.91 accepts on a signing leaf (documentSigning and c2pa's own
# claimSigning OID are refused by this version's default trust configuration).
ACCEPTED_EKUS = {
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
}
_SETTINGS = {
    "builder": {"thumbnail": {"enabled": False}},
    # Offline by design: no manifest or revocation fetches while signing or verifying.
    "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False},
}
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class CredentialsError(Exception):
    """The signing certificate or key is missing, unreadable or unusable; the message names what
    and which setting (`T2I_C2PA_CERT` / `T2I_C2PA_KEY`)."""


class SigningError(Exception):
    """c2pa could not sign these bytes (a format it does not take, or not the image it says)."""


@dataclass(frozen=True)
class Ingredient:
    """An input image of image-to-image, inpainting or ControlNet."""

    role: str  # "init_image", "mask", "control:<type>"
    sha256: str
    content_type: str


@dataclass(frozen=True)
class Claims:
    """What the manifest asserts about one image."""

    generator: str
    generator_version: str
    model_id: str
    model_sha256: str | None
    loras: tuple[tuple[str, float], ...]
    controlnets: tuple[str, ...]
    job_id: str
    image_index: int
    watermark: str | None
    prompt: str | None
    negative_prompt: str | None
    ingredients: tuple[Ingredient, ...]
    development_signer: bool


@dataclass(frozen=True)
class ManifestReport:
    """What `read_manifest` found.

    `valid`: a manifest is present, its signature verifies and its hard bindings (the image's
    hash) match: no failure code but trust ones. Trust in the signer is reported apart: without
    a trust list holding the signer's CA, c2pa reports `signingCredential.untrusted` (kept in
    `failures`, `validation_state` "Valid" rather than "Trusted") and `valid` stays True; a
    changed image gives `assertion.dataHash.mismatch` and `valid` False.

    `claims`: our assertion's fields as signed (`loras` as `{name, scale}` objects, `ingredients`
    as `{role, sha256, content_type}`), plus the `c2pa.created` action's `digital_source_type`
    and `software_agent`, and `c2pa_ingredients` (title, format, relationship, sha256) from the
    manifest's ingredient list.
    """

    present: bool
    valid: bool
    validation_state: str | None
    failures: tuple[str, ...]
    signer: str | None
    claim_generator: str | None
    claims: dict[str, Any] = field(default_factory=dict)
    development_signer: bool = False


class _PerProcess(threading.local):
    """c2pa's objects belong to the process that made them (a forked Celery child gets closed
    copies) and are not meant to be shared across threads mid-call: one set per thread and pid."""

    pid: int | None = None
    signer: Any = None
    context: Any = None


class CredentialSigner:
    """Signs images with one certificate chain and key; thread-safe (each thread its own native
    signer, each image its own builder)."""

    def __init__(
        self, cert_chain_pem: bytes, private_key_pem: bytes, alg: Any, tsa_url: str | None
    ) -> None:
        self._chain = cert_chain_pem
        self._key = private_key_pem
        self._alg = alg
        self._tsa_url = tsa_url
        self._local = _PerProcess()
        leaf = x509.load_pem_x509_certificates(cert_chain_pem)[0]
        self.development = _is_development(leaf)

    @classmethod
    def from_pem(
        cls, cert_chain_pem: bytes, private_key_pem: bytes, tsa_url: str | None = None
    ) -> "CredentialSigner":
        """Check the chain and key as C2PA needs them, then sign a tiny image with them, so a bad
        credential fails here (at worker start) rather than at the first job."""
        chain = _load_chain(cert_chain_pem)
        key = _load_key(private_key_pem)
        alg = _check_pair(chain, key)
        signer = cls(cert_chain_pem, private_key_pem, alg, tsa_url)
        try:
            signer._native_signer()
        except c2pa.C2paError as exc:
            raise CredentialsError(f"c2pa refused {CERT_SETTING}/{KEY_SETTING}: {exc}") from exc
        probe = _tiny_png()
        claims = Claims(
            generator="txt2img-service",
            generator_version="0",
            model_id="start-up check",
            model_sha256=None,
            loras=(),
            controlnets=(),
            job_id="start-up check",
            image_index=0,
            watermark=None,
            prompt=None,
            negative_prompt=None,
            ingredients=(),
            development_signer=signer.development,
        )
        try:
            signed = signer.sign(probe, "image/png", claims)
        except SigningError as exc:
            raise CredentialsError(
                f"a test signing with {CERT_SETTING}/{KEY_SETTING} failed: {exc}"
                + (f" (timestamp authority {tsa_url})" if tsa_url else "")
            ) from exc
        report = read_manifest(signed, "image/png")
        if not report.valid:
            raise CredentialsError(
                f"a test signing with {CERT_SETTING}/{KEY_SETTING} does not verify: "
                + ", ".join(report.failures)
            )
        return signer

    @classmethod
    def from_files(
        cls, cert_path: str | Path, key_path: str | Path, tsa_url: str | None = None
    ) -> "CredentialSigner":
        """`from_pem` on the files' contents; CredentialsError naming the file and setting when
        one is missing or unreadable."""
        return cls.from_pem(
            _read(cert_path, CERT_SETTING), _read(key_path, KEY_SETTING), tsa_url=tsa_url
        )

    def sign(self, data: bytes, content_type: str, claims: Claims) -> bytes:
        """The image (PNG, JPEG or WebP bytes) with a signed manifest of `claims` embedded; its
        pixels and metadata (PNG text chunks, EXIF) are left as they were."""
        if content_type not in _EXTENSIONS:
            raise SigningError(f"cannot sign {content_type}: PNG, JPEG or WebP only")
        out = io.BytesIO()
        try:
            builder = c2pa.Builder(_manifest(claims, content_type), context=self._context())
            builder.sign(self._native_signer(), content_type, io.BytesIO(data), out)
        except c2pa.C2paError as exc:
            raise SigningError(f"c2pa could not sign this {content_type}: {exc}") from exc
        return out.getvalue()

    def _native_signer(self) -> Any:
        local = self._local
        if local.pid != os.getpid() or local.signer is None:
            info = c2pa.C2paSignerInfo(self._alg, self._chain, self._key, self._tsa_url)
            local.signer = c2pa.Signer.from_info(info)
            local.context = _new_context()
            local.pid = os.getpid()
        return local.signer

    def _context(self) -> Any:
        self._native_signer()
        return self._local.context


def make_development_credentials(directory: Path) -> tuple[Path, Path]:
    """A development CA and an ES256 signing leaf c2pa accepts, as `<directory>/c2pa-dev-chain.pem`
    (leaf, then CA) and `c2pa-dev-key.pem` (mode 0600); when both exist they are returned
    unchanged.

    Leaf: not a CA, digitalSignature key usage, emailProtection EKU, SKI and AKI, three years;
    CA: basicConstraints CA (path length 0), keyCertSign and cRLSign, SKI, ten years. Both
    subjects carry O=txt2img-service development signer (`development` tells it by that).
    """
    directory = Path(directory)
    chain_path, key_path = directory / DEV_CHAIN_NAME, directory / DEV_KEY_NAME
    if chain_path.exists() and key_path.exists():
        return chain_path, key_path
    directory.mkdir(parents=True, exist_ok=True)
    # Under a lock, and each file renamed into place (the key first), so a process racing this
    # one, or checking without the lock, never takes a chain and key of two different pairs.
    with _exclusive(directory / ".c2pa-dev.lock"):
        if not (chain_path.exists() and key_path.exists()):
            chain_pem, key_pem = _new_development_pair()
            _write_atomically(key_path, key_pem, 0o600)
            _write_atomically(chain_path, chain_pem, 0o644)
    return chain_path, key_path


def read_manifest(data: bytes, content_type: str | None = None) -> ManifestReport:
    """The manifest embedded in `data` and how it validates (see `ManifestReport`). Never raises
    for an image without a manifest or for bytes that are no image (present False; `failures`
    says why for the latter). Without `content_type` the format is told from the bytes."""
    fmt = content_type or sniff_content_type(data)
    try:
        reader = c2pa.Reader(fmt, io.BytesIO(data), context=_reader_context())
        try:
            store = json.loads(reader.json())
        finally:
            reader.close()
    except c2pa.C2paError as exc:
        if type(exc).__name__ == "_C2paManifestNotFound" or "ManifestNotFound" in str(exc):
            return ManifestReport(False, False, None, (), None, None)
        return ManifestReport(False, False, None, (f"manifest.unreadable: {exc}",), None, None)
    except Exception as exc:  # the verify endpoint reports bad input, never fails on it
        return ManifestReport(False, False, None, (f"manifest.unreadable: {exc}",), None, None)
    return _report(store)


def sniff_content_type(data: bytes) -> str | None:
    """image/png, image/jpeg or image/webp from the magic bytes; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


# --- the manifest ---------------------------------------------------------------------------


def _manifest(claims: Claims, content_type: str) -> dict[str, Any]:
    agent = {"name": claims.generator, "version": claims.generator_version}
    created: dict[str, Any] = {
        "action": "c2pa.created",
        "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
        "softwareAgent": agent,
    }
    ingredients = [
        {
            "title": ingredient.role,
            "format": ingredient.content_type,
            "relationship": "inputTo",
            "label": f"ingredient-{n}",
            "metadata": {f"{ASSERTION_LABEL}.role": ingredient.role, "sha256": ingredient.sha256},
        }
        for n, ingredient in enumerate(claims.ingredients)
    ]
    if ingredients:
        created["parameters"] = {"ingredientIds": [item["label"] for item in ingredients]}
    generation: dict[str, Any] = {
        "model_id": claims.model_id,
        "model_sha256": claims.model_sha256,
        "loras": [{"name": name, "scale": scale} for name, scale in claims.loras],
        "controlnets": list(claims.controlnets),
        "job_id": claims.job_id,
        "image_index": claims.image_index,
        "watermark": claims.watermark,
        "development_signer": claims.development_signer,
        "ingredients": [
            {"role": item.role, "sha256": item.sha256, "content_type": item.content_type}
            for item in claims.ingredients
        ],
    }
    if claims.prompt is not None:
        generation["prompt"] = claims.prompt
    if claims.negative_prompt is not None:
        generation["negative_prompt"] = claims.negative_prompt
    return {
        "claim_generator_info": [agent],
        "title": f"{claims.job_id}-{claims.image_index}.{_EXTENSIONS[content_type]}",
        "format": content_type,
        "ingredients": ingredients,
        "assertions": [
            {"label": "c2pa.actions.v2", "data": {"actions": [created]}},
            {"label": ASSERTION_LABEL, "data": generation},
        ],
    }


def _report(store: dict[str, Any]) -> ManifestReport:
    state = store.get("validation_state")
    active = store.get("validation_results", {}).get("activeManifest")
    if active is not None:
        statuses = active.get("failure", [])
    else:
        statuses = store.get("validation_status", [])
    failures = tuple(dict.fromkeys(status["code"] for status in statuses if "code" in status))
    manifest = store.get("manifests", {}).get(store.get("active_manifest") or "")
    if manifest is None:
        return ManifestReport(True, False, state, failures or ("manifest.missing",), None, None)
    claims: dict[str, Any] = {}
    for assertion in manifest.get("assertions", []):
        label = assertion.get("label", "")
        if label == ASSERTION_LABEL:
            claims.update(assertion.get("data", {}))
        elif label in ("c2pa.actions", "c2pa.actions.v2"):
            for action in assertion.get("data", {}).get("actions", []):
                if action.get("action") == "c2pa.created":
                    claims["digital_source_type"] = action.get("digitalSourceType")
                    claims["software_agent"] = action.get("softwareAgent")
    claims["c2pa_ingredients"] = [
        {key: item.get(key) for key in ("title", "format", "relationship")}
        | {"sha256": (item.get("metadata") or {}).get("sha256")}
        for item in manifest.get("ingredients", [])
    ]
    generators = manifest.get("claim_generator_info") or []
    claim_generator = manifest.get("claim_generator")
    if generators:
        first = generators[0]
        claim_generator = "/".join(str(p) for p in (first.get("name"), first.get("version")) if p)
    signature = manifest.get("signature_info") or {}
    signer = signature.get("issuer") or signature.get("common_name")
    valid = state in ("Valid", "Trusted") and not set(failures) - TRUST_ONLY_CODES
    development = claims.get("development_signer") is True or DEVELOPMENT_MARKER in (
        f"{signature.get('issuer')} {signature.get('common_name')}"
    )
    return ManifestReport(
        True, valid, state, failures, signer, claim_generator, claims, development
    )


# --- certificates and keys ------------------------------------------------------------------


def _read(path: str | Path, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from exc


def _load_chain(pem: bytes) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CredentialsError(f"{CERT_SETTING} holds no PEM certificate chain: {exc}") from exc
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CredentialsError(
                f"{CERT_SETTING}: the chain is out of order or broken: "
                f"{child.subject.rfc4514_string()} is not issued by "
                f"{parent.subject.rfc4514_string()} (leaf first, then its issuers)"
            ) from exc
    return chain


def _load_key(pem: bytes) -> Any:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialsError(
            f"{KEY_SETTING} holds no unencrypted PEM private key: {exc}"
        ) from exc


def _check_pair(chain: list[x509.Certificate], key: Any) -> Any:
    """The c2pa signing algorithm for `key`, after checking the leaf is one C2PA accepts."""
    leaf = chain[0]
    subject = leaf.subject.rfc4514_string()
    if leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CredentialsError(
            f"{KEY_SETTING} is not the key of {CERT_SETTING}'s leaf certificate ({subject})"
        )
    if isinstance(key, ec.EllipticCurvePrivateKey):
        curves = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        if key.curve.name not in curves:
            raise CredentialsError(
                f"{KEY_SETTING}: the EC curve {key.curve.name} is not one C2PA signs with "
                "(P-256, P-384, P-521)"
            )
        alg = getattr(c2pa.C2paSigningAlg, curves[key.curve.name])
    elif isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise CredentialsError(f"{KEY_SETTING}: an RSA key of {key.key_size} bits (min 2048)")
        alg = c2pa.C2paSigningAlg.PS256
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        alg = c2pa.C2paSigningAlg.ED25519
    else:
        raise CredentialsError(
            f"{KEY_SETTING}: a {type(key).__name__}; C2PA signs with EC (P-256/384/521), RSA-PSS "
            "or Ed25519 keys"
        )
    if _self_signed(leaf):
        raise CredentialsError(
            f"{CERT_SETTING}: the leaf certificate ({subject}) is self-signed; C2PA needs a "
            "signing certificate issued by a CA, chain leaf first"
        )
    try:
        ca = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if ca:
        raise CredentialsError(
            f"{CERT_SETTING}: the leaf certificate ({subject}) is a CA certificate; C2PA signs "
            "with an end-entity certificate"
        )
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or not usage.digital_signature:
        raise CredentialsError(
            f"{CERT_SETTING}: the leaf certificate ({subject}) lacks the digitalSignature key usage"
        )
    try:
        ekus = set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        ekus = set()
    if not ekus & ACCEPTED_EKUS.keys():
        raise CredentialsError(
            f"{CERT_SETTING}: the leaf certificate ({subject}) needs an extended key usage c2pa "
            f"accepts ({', '.join(ACCEPTED_EKUS.values())})"
        )
    now = datetime.datetime.now(datetime.UTC)
    for cert in chain:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CredentialsError(
                f"{CERT_SETTING}: {cert.subject.rfc4514_string()} is valid from "
                f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}, "
                "not now"
            )
    return alg


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    public = cert.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(
                cert.signature,
                cert.tbs_certificate_bytes,
                ec.ECDSA(cert.signature_hash_algorithm),
            )
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(
                cert.signature,
                cert.tbs_certificate_bytes,
                padding.PKCS1v15(),
                cert.signature_hash_algorithm,
            )
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return True
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _is_development(leaf: x509.Certificate) -> bool:
    names = leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return any(name.value == DEVELOPMENT_MARKER for name in names)


# --- the development chain ------------------------------------------------------------------


def _new_development_pair() -> tuple[bytes, bytes]:
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEVELOPMENT_MARKER),
            x509.NameAttribute(NameOID.COMMON_NAME, "txt2img-service development CA"),
        ]
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEVELOPMENT_MARKER),
                    x509.NameAttribute(NameOID.COMMON_NAME, "txt2img-service development signing"),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=3 * 365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    chain = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in (leaf, ca))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain, key_pem


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive lock on a file (flock), held for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- c2pa contexts --------------------------------------------------------------------------


def _new_context() -> Any:
    settings = c2pa.Settings.from_dict(_SETTINGS)
    try:
        return c2pa.Context(settings=settings)
    finally:
        settings.close()


_readers = _PerProcess()


def _reader_context() -> Any:
    if _readers.pid != os.getpid() or _readers.context is None:
        _readers.context = _new_context()
        _readers.pid = os.getpid()
    return _readers.context


def _tiny_png() -> bytes:
    """An 8x8 grey PNG, without Pillow (the API process has it, but this needs nothing)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    rows = b"".join(b"\x00" + b"\x80" * 8 for _ in range(8))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def sha256_hex(data: bytes) -> str:
    """The hex sha256 of `data`, as `Ingredient.sha256` wants it."""
    return hashlib.sha256(data).hexdigest()
