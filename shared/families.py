"""Model families: what a request may ask of a model depends on the family its weights belong to
(SD 1.5 or SDXL). Workers say which family they serve; the API validates and fills in a request
by the family of the model it names."""

from dataclasses import dataclass
from typing import Literal

ModelFamilyName = Literal["sd15", "sdxl"]


@dataclass(frozen=True)
class ModelFamily:
    name: ModelFamilyName
    # How people call it, in messages.
    title: str
    # A request's width and height when it gives none: the size the family was trained at.
    default_size: int
    # The sizes a request may ask for (each side), in multiples of `size_multiple`.
    min_size: int
    max_size: int
    # The text features the real models' cross-attention takes (an adapter trained on the
    # family has them); tiny test models have fewer.
    cross_attention_dim: int
    size_multiple: int = 8


SD15 = ModelFamily(
    name="sd15",
    title="SD 1.5",
    default_size=512,
    min_size=256,
    max_size=1024,
    cross_attention_dim=768,
)
SDXL = ModelFamily(
    name="sdxl",
    title="SDXL",
    default_size=1024,
    min_size=512,
    max_size=2048,
    cross_attention_dim=2048,
)
FAMILIES: dict[ModelFamilyName, ModelFamily] = {family.name: family for family in (SD15, SDXL)}
# The family of a model nothing says otherwise of (a worker from before families were told).
DEFAULT_FAMILY = SD15
# Any family's bounds: what the request schema itself accepts before the model's family narrows it.
MIN_SIZE = min(family.min_size for family in FAMILIES.values())
MAX_SIZE = max(family.max_size for family in FAMILIES.values())
