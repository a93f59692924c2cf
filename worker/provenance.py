"""Every stored image says where it came from: the invisible watermark goes into the pixels before
they are encoded, then a signed C2PA manifest binds the encoded file (docs/provenance.md).

Both run in the job's task thread, within its encode-and-upload step, never on the GPU thread.
"""

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL.Image import Image

from shared import watermark
from shared.content_credentials import (
    Claims,
    CredentialsError,
    CredentialSigner,
    Ingredient,
    make_development_credentials,
)
from shared.info import SERVICE_NAME, SERVICE_VERSION
from shared.provenance import WatermarkPayload
from shared.schema import ImageProvenance, JobRecord
from shared.settings import Environment, ProvenanceSettings
from worker.models import ModelSource

log = logging.getLogger(__name__)

_HASH_CHUNK = 16 * 2**20
# A hub download's file is a link to a blob named by its SHA-256.
_BLOB_NAME = re.compile(r"[0-9a-f]{64}")
_DIFFUSERS_WEIGHTS = (
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.bin",
)


@dataclass(frozen=True)
class Marker:
    """Marks one worker's images: a signer (None where provenance is off) and what it asserts."""

    signer: CredentialSigner | None
    model_id: str
    model_sha256: str | None
    include_prompt: bool

    def mark(
        self,
        image: Image,
        record: JobRecord,
        index: int,
        content_type: str,
        encode: Callable[[Image], bytes],
    ) -> tuple[bytes, ImageProvenance]:
        """The image encoded, watermarked unless its key is exempt, and signed."""
        if self.signer is None:
            return encode(image), ImageProvenance(c2pa_manifest=False, watermark=False)
        payload = None
        if record.watermark and watermark.fits(image):
            payload = WatermarkPayload.of(record.id, index)
            image = watermark.embed(image, payload.to_int())
        data = self.signer.sign(
            encode(image),
            content_type,
            self._claims(record, index, payload.describe() if payload else None),
        )
        return data, ImageProvenance(
            c2pa_manifest=True,
            development_signer=self.signer.development,
            watermark=payload is not None,
        )

    def _claims(self, record: JobRecord, index: int, watermark_label: str | None) -> Claims:
        request = record.request
        return Claims(
            generator=SERVICE_NAME,
            generator_version=SERVICE_VERSION,
            model_id=self.model_id,
            model_sha256=self.model_sha256,
            loras=tuple((lora.name, lora.scale) for lora in request.loras),
            controlnets=(request.control.type,) if request.control is not None else (),
            job_id=record.id,
            image_index=index,
            watermark=watermark_label,
            prompt=request.prompt if self.include_prompt else None,
            negative_prompt=request.negative_prompt or None if self.include_prompt else None,
            ingredients=_ingredients(record),
            development_signer=self.signer.development if self.signer else False,
        )


def _ingredients(record: JobRecord) -> tuple[Ingredient, ...]:
    """The job's input images, by the SHA-256 the API recorded for each (`sha256:<hex>`)."""
    request = record.request
    named = [("init_image", request.init_image), ("mask", request.mask_image)]
    if request.control is not None:
        named.append((f"control:{request.control.type}", request.control.image))
    return tuple(
        Ingredient(role=role, sha256=value.removeprefix("sha256:"), content_type="image/png")
        for role, value in named
        if isinstance(value, str) and value.startswith("sha256:")
    )


def load_marker(
    settings: ProvenanceSettings,
    model_id: str,
    source: Callable[[], ModelSource],
    cache_dir: Path,
) -> Marker:
    """The worker's marker; CredentialsError (the worker refuses to start, before `source`
    resolves the model) where provenance is on and no usable certificate and key are
    configured."""
    if not settings.provenance:
        log.warning(
            "provenance is OFF (T2I_PROVENANCE=false): images carry no watermark and no manifest"
        )
        return Marker(None, model_id, None, False)
    signer = _signer(settings, cache_dir)
    if signer.development:
        log.warning(
            "signing Content Credentials with a DEVELOPMENT certificate; set T2I_C2PA_CERT and "
            "T2I_C2PA_KEY to the operator's (docs/provenance.md)"
        )
    return Marker(signer, model_id, weights_sha256(source(), cache_dir), settings.provenance_prompt)


def _signer(settings: ProvenanceSettings, cache_dir: Path) -> CredentialSigner:
    cert, key = settings.c2pa_cert, settings.c2pa_key
    if cert is None and key is None:
        if settings.env is not Environment.DEVELOPMENT:
            raise CredentialsError(
                "provenance is on (T2I_PROVENANCE) but no signing certificate is configured: set "
                "T2I_C2PA_CERT and T2I_C2PA_KEY (docs/provenance.md), or T2I_PROVENANCE=false"
            )
        cert_path, key_path = make_development_credentials(cache_dir / "c2pa")
        return CredentialSigner.from_files(cert_path, key_path, settings.c2pa_tsa_url)
    if cert is None or key is None:
        missing = "T2I_C2PA_CERT" if cert is None else "T2I_C2PA_KEY"
        raise CredentialsError(f"{missing} is unset: set both T2I_C2PA_CERT and T2I_C2PA_KEY")
    return CredentialSigner.from_pem(
        _pem(cert, "T2I_C2PA_CERT"), _pem(key, "T2I_C2PA_KEY"), settings.c2pa_tsa_url
    )


def _pem(value: str, setting: str) -> bytes:
    """A setting's PEM: the text itself (from a secret), or the file it names."""
    if value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{setting}: cannot read {value}: {exc.strerror}") from exc


def weights_sha256(source: ModelSource, cache_dir: Path) -> str | None:
    """The SHA-256 of the checkpoint file, or of the UNet's weights for a diffusers directory or
    hub model; None where no such file is on this machine."""
    weights = _weights_file(source.weights)
    if weights is None:
        return None
    resolved = weights.resolve()
    if _BLOB_NAME.fullmatch(resolved.name):
        return resolved.name
    return _cached_hash(resolved, cache_dir / "weights-sha256.json")


def _weights_file(weights: str) -> Path | None:
    path = Path(weights)
    if path.is_file():
        return path
    if path.is_dir():
        return next((path / name for name in _DIFFUSERS_WEIGHTS if (path / name).is_file()), None)
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    for name in _DIFFUSERS_WEIGHTS:
        try:
            found = try_to_load_from_cache(weights, name)
        except HFValidationError:
            # Not a hub id either (a simulated model's name): no weights to hash.
            return None
        if isinstance(found, str):
            return Path(found)
    return None


def _cached_hash(path: Path, cache_file: Path) -> str:
    """Hashing a multi-GB checkpoint takes seconds: once per file version, then from the cache."""
    stat = path.stat()
    version = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(version), str):
        return known[version]
    digest = hashlib.sha256()
    with path.open("rb") as weights:
        while chunk := weights.read(_HASH_CHUNK):
            digest.update(chunk)
    known = {version: digest.hexdigest()} | (known if isinstance(known, dict) else {})
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(known))
        temporary.replace(cache_file)
    except OSError as exc:
        log.warning("could not keep the weights' hash in %s: %s", cache_file, exc)
    return known[version]
