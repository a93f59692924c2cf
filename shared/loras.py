"""The LoRA adapter registry: a directory of `.safetensors` files the operator controls, each
adapter named by its file's name. The API lists and checks names here; workers load the files.

An adapter's layout (its rank, and the layers it targets that the workers' LoRA slots do not
cover) is read from the safetensors header alone, without torch."""

import json
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from shared.errors import ErrorType, ServiceError
from shared.families import FAMILIES, SD15
from shared.model_families import ModelTarget
from shared.schema import LoraSpec

LORA_SUFFIX = ".safetensors"
# The safetensors format's own cap on its header.
_MAX_HEADER_BYTES = 100_000_000
# How a LoRA weight's name ends, by its role: diffusers/PEFT, diffusers before PEFT, kohya/A1111.
_LORA_PARTS = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "alpha": "alpha",
}
# Attention processors' LoRA layers as early diffusers saved them: `attn1.processor.to_q_lora.down`.
_PROCESSOR_LORA = re.compile(
    r"(?P<block>.+?)(?:\.processor)?\.(?P<layer>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight"
)
_TEXT_ENCODER_LAYERS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# What the slots cover, on a module name with its dots turned into underscores (kohya's form).
_COVERED = re.compile(
    r"(?:^|_)(?:"
    r"transformer_blocks_\d+_(?:attn[12]_(?:to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2)"
    r"|attentions_\d+_proj_(?:in|out)"
    r"|(?:input_blocks_\d+|middle_block|output_blocks_\d+)_1_proj_(?:in|out)"
    r"|layers_\d+_(?:self_attn_(?:q|k|v|out)_proj|mlp_fc[12])"
    r")$"
)
_NAMED_UNSUPPORTED = 3
# The UNet's cross-attention key and value layers: their in-features are the text features the
# model the adapter was trained on feeds them (SD 1.5: 768, SDXL: 2048).
_CROSS_ATTENTION = re.compile(r"(?:^|_)attn2_to_[kv]$")
# SDXL's second text encoder: diffusers' and kohya's names.
_SECOND_TEXT_ENCODER = ("text_encoder_2.", "lora_te2_")


@dataclass(frozen=True)
class AdapterLayout:
    """What the workers' LoRA slots need to know of an adapter file."""

    # The largest rank of any of its layers.
    rank: int
    # Its modules (and weights of kinds other than LoRA) that the slots do not cover, sorted.
    unsupported: tuple[str, ...]


@dataclass(frozen=True)
class AdapterModel:
    """What an adapter file tells of the model it was trained on."""

    # The in-features of its UNet cross-attention key/value layers; None when it has none.
    cross_attention_dim: int | None
    # Whether it has weights for a second text encoder (SDXL's).
    second_text_encoder: bool


def _made_for(dim: int) -> str:
    """The model an adapter whose cross-attention takes `dim` text features was made for."""
    for family in FAMILIES.values():
        if dim == family.cross_attention_dim:
            return family.title
    return f"a model whose cross-attention takes {dim} text features"


def adapter_model(path: Path) -> AdapterModel:
    """What the adapter in `path` tells of its model; ValueError for a file that is not
    safetensors."""
    stat = path.stat()
    return _read_model(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=1024)
def _read_model(path: Path, mtime_ns: int, size: int) -> AdapterModel:
    dims: set[int] = set()
    second = False
    for key, shape in _tensor_shapes(path, size).items():
        second = second or key.startswith(_SECOND_TEXT_ENCODER)
        split = _lora_module(key)
        if split is None or split[1] != "down" or len(shape) < 2:
            continue
        if _CROSS_ATTENTION.search(split[0].replace(".", "_")):
            dims.add(shape[1])
    # One dimension in any adapter trained on one model; the largest of several, should a file
    # mix them, is the one that names a family.
    return AdapterModel(max(dims) if dims else None, second)


def slot_covers(module: str) -> bool:
    """Whether the LoRA slots cover `module` (diffusers' dotted name or kohya's underscored one)."""
    return _COVERED.search(module.replace(".", "_")) is not None


def adapter_layout(path: Path) -> AdapterLayout:
    """The layout of the adapter in `path`; ValueError for a file that is not a LoRA adapter."""
    stat = path.stat()
    return _read_layout(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=1024)
def _read_layout(path: Path, mtime_ns: int, size: int) -> AdapterLayout:
    """The layout of `path` as it was at (`mtime_ns`, `size`): a changed file is read again."""
    ranks: list[int] = []
    unsupported: set[str] = set()
    for key, shape in _tensor_shapes(path, size).items():
        split = _lora_module(key)
        if split is None:
            unsupported.add(key.removesuffix(".weight"))
            continue
        module, role = split
        if role == "down":
            if not shape:
                raise ValueError(f"{path.name}: the LoRA weight {key!r} has no dimensions")
            ranks.append(shape[0])
        if not slot_covers(module):
            unsupported.add(module)
    if not ranks:
        raise ValueError(
            f"{path.name} holds no LoRA weights (no `lora_A`, `lora.down` or `lora_down` weight)"
        )
    return AdapterLayout(rank=max(ranks), unsupported=tuple(sorted(unsupported)))


def _tensor_shapes(path: Path, size: int) -> dict[str, list[int]]:
    """Each tensor's shape, by name, from the safetensors header of `path` (`size` bytes)."""
    not_safetensors = f"{path.name} is not a safetensors file"
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{not_safetensors}: it is shorter than a header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{not_safetensors}: its header length is out of range")
        raw = file.read(length)
    try:
        header: Any = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{not_safetensors}: its header is not JSON") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{not_safetensors}: its header is not a JSON object")
    shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) for n in shape):
            raise ValueError(f"{not_safetensors}: tensor {name!r} has no shape")
        shapes[name] = shape
    return shapes


def _lora_module(key: str) -> tuple[str, str] | None:
    """The module a LoRA weight belongs to and its role (down, up, alpha); None for other keys."""
    for part, role in _LORA_PARTS.items():
        if key.endswith(f".{part}"):
            return key.removesuffix(f".{part}"), role
    old = _PROCESSOR_LORA.fullmatch(key)
    if old is None:
        return None
    block, layer = old["block"], old["layer"]
    if block.endswith("self_attn"):
        layer = _TEXT_ENCODER_LAYERS[layer]
    elif layer == "to_out":
        layer = "to_out.0"
    return f"{block}.{layer}", old["role"]


class LoraInfo(BaseModel):
    """An adapter as `GET /v1/loras` lists it."""

    name: str = Field(description="what a request's `loras[].name` names")
    size_bytes: int
    rank: int | None = Field(
        description=(
            "the adapter's LoRA rank (its largest layer's); the ranks of a request's adapters add "
            "up, and may not exceed the service's limit; null when the file is not a LoRA adapter"
        )
    )


class LoraList(BaseModel):
    data: list[LoraInfo]


def _rank_or_none(path: Path) -> int | None:
    try:
        return adapter_layout(path).rank
    except (OSError, ValueError):
        return None


def _refused(message: str, loc: list[str | int], msg: str, kind: str, **ctx: Any) -> ServiceError:
    detail: dict[str, Any] = {"loc": loc, "msg": msg, "type": kind}
    if ctx:
        detail["ctx"] = ctx
    return ServiceError(ErrorType.VALIDATION_ERROR, message, [detail])


@dataclass(frozen=True)
class LoraRegistry:
    """The adapters in `directory` (none when it is unset)."""

    directory: Path | None

    def path(self, name: str) -> Path | None:
        """The adapter's file, or None when the registry has no such adapter."""
        if self.directory is None or "/" in name or name.startswith("."):
            return None
        candidate = self.directory / f"{name}{LORA_SUFFIX}"
        return candidate if candidate.is_file() else None

    def listing(self) -> LoraList:
        if self.directory is None or not self.directory.is_dir():
            return LoraList(data=[])
        files = sorted(self.directory.glob(f"*{LORA_SUFFIX}"))
        return LoraList(
            data=[
                LoraInfo(
                    name=file.name.removesuffix(LORA_SUFFIX),
                    size_bytes=file.stat().st_size,
                    rank=_rank_or_none(file),
                )
                for file in files
                if file.is_file() and not file.name.startswith(".")
            ]
        )

    def check(
        self, loras: list[LoraSpec], max_rank: int, target: ModelTarget | None = None
    ) -> None:
        """A 422 for the first adapter the registry does not hold, cannot read, whose layers the
        LoRA slots do not cover or that was made for another model than `target` (unchecked when
        None or not known), or for adapters whose ranks add up to more than `max_rank`."""
        ranks = {lora.name: self._rank(index, lora.name) for index, lora in enumerate(loras)}
        if target is not None and target.known:
            for index, lora in enumerate(loras):
                self._check_model(index, lora.name, target)
        total = sum(ranks.values())
        if total <= max_rank:
            return
        if len(ranks) == 1:
            [(name, rank)] = ranks.items()
            what = f"LoRA adapter {name!r} has rank {rank}"
        else:
            each = ", ".join(f"{name}: {rank}" for name, rank in ranks.items())
            what = f"the LoRA adapters' ranks add up to {total} ({each})"
        raise _refused(
            f"{what}, more than the {max_rank} the workers' LoRA slots hold; name fewer or smaller "
            "adapters, or raise T2I_LORA_MAX_RANK on the workers and the API",
            ["body", "loras"],
            "the adapters' ranks add up to more than the LoRA slots' rank",
            "lora_rank_too_large",
            ranks=ranks,
            max_rank=max_rank,
        )

    def _rank(self, index: int, name: str) -> int:
        """The rank of adapter `name`, the request's `index`th, once it passes every check."""
        loc: list[str | int] = ["body", "loras", index, "name"]
        path = self.path(name)
        if path is None:
            raise _refused(
                f"no LoRA adapter named {name!r}; GET /v1/loras lists them",
                loc,
                "unknown LoRA adapter",
                "lora_unknown",
            )
        try:
            layout = adapter_layout(path)
        except (OSError, ValueError) as exc:
            raise _refused(
                f"LoRA adapter {name!r} cannot be read as a LoRA adapter: {exc}",
                loc,
                "not a LoRA adapter",
                "lora_invalid",
            ) from exc
        if layout.unsupported:
            named = ", ".join(layout.unsupported[:_NAMED_UNSUPPORTED])
            more = len(layout.unsupported) - _NAMED_UNSUPPORTED
            if more > 0:
                named += f" and {more} more"
            raise _refused(
                f"LoRA adapter {name!r} targets layers the service's LoRA slots do not cover "
                f"({named}); the slots cover the attention, feed-forward and projection layers of "
                "the UNet's transformer blocks and of the text encoder",
                loc,
                "the adapter targets layers the LoRA slots do not cover",
                "lora_unsupported",
            )
        return layout.rank

    def _check_model(self, index: int, name: str, target: ModelTarget) -> None:
        """A 422 when adapter `name` (readable: `_rank` passed it) was made for another model."""
        path = self.path(name)
        assert path is not None
        made = adapter_model(path)
        dim = made.cross_attention_dim
        other_dim = dim is not None and target.cross_attention_dim not in (None, dim)
        second_on_sd15 = made.second_text_encoder and target.family is SD15
        if dim is not None and other_dim:
            made_for = _made_for(dim)
        elif second_on_sd15:
            made_for = "SDXL (it has weights for a second text encoder)"
        else:
            return
        raise _refused(
            f"LoRA adapter {name!r} was made for {made_for}, not for {target.describe()}; "
            "GET /v1/models tells each model's family",
            ["body", "loras", index, "name"],
            "the adapter was made for another model",
            "lora_wrong_model",
        )
