"""The LoRA adapter registry: a directory of `.safetensors` files the operator controls, each
adapter named by its file's name. The API lists and checks names here; workers load the files."""

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from shared.errors import ErrorType, ServiceError
from shared.schema import LoraSpec

LORA_SUFFIX = ".safetensors"


class LoraInfo(BaseModel):
    """An adapter as `GET /v1/loras` lists it."""

    name: str = Field(description="what a request's `loras[].name` names")
    size_bytes: int


class LoraList(BaseModel):
    data: list[LoraInfo]


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
                LoraInfo(name=file.name.removesuffix(LORA_SUFFIX), size_bytes=file.stat().st_size)
                for file in files
                if file.is_file() and not file.name.startswith(".")
            ]
        )

    def check(self, loras: list[LoraSpec]) -> None:
        """A 422 for the first adapter the registry does not hold."""
        for index, lora in enumerate(loras):
            if self.path(lora.name) is None:
                raise ServiceError(
                    ErrorType.VALIDATION_ERROR,
                    f"no LoRA adapter named {lora.name!r}; GET /v1/loras lists them",
                    [
                        {
                            "loc": ["body", "loras", index, "name"],
                            "msg": "unknown LoRA adapter",
                            "type": "lora_unknown",
                        }
                    ],
                )
