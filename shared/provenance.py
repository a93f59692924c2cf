"""What the invisible watermark says about an image: which job made it, and which of its images.

A job id is 128 random bits (uuid4 hex); the watermark has room for 48, so it carries the first
40 bits of the id and the image's index in its job. The job store maps those 40 bits back to the
id for as long as the job is kept (`shared.keys.watermark_key`); two live jobs sharing them are
rare enough (one in 2^40 a pair) that the verify answer checks the job's owner anyway.
"""

from dataclasses import dataclass

JOB_ID_PREFIX_HEX = 10
_INDEX_BITS = 8
WATERMARK_SCHEME = "dwt-dct-48"


@dataclass(frozen=True)
class WatermarkPayload:
    job_id_prefix: str
    image_index: int

    @classmethod
    def of(cls, job_id: str, image_index: int) -> "WatermarkPayload":
        if not 0 <= image_index < 2**_INDEX_BITS:
            raise ValueError(f"image index {image_index} does not fit the watermark")
        return cls(job_id[:JOB_ID_PREFIX_HEX].lower(), image_index)

    @classmethod
    def from_int(cls, payload: int) -> "WatermarkPayload":
        prefix = payload >> _INDEX_BITS
        return cls(f"{prefix:0{JOB_ID_PREFIX_HEX}x}", payload & (2**_INDEX_BITS - 1))

    def to_int(self) -> int:
        return int(self.job_id_prefix, 16) << _INDEX_BITS | self.image_index

    def describe(self) -> str:
        """How the manifest names the watermark it binds."""
        return f"{WATERMARK_SCHEME}:{self.to_int():012x}"
