"""LoRA adapters as hot-swapped weights in fixed slots, so they run on the compiled UNet.

Before the UNet is compiled, every layer an adapter may target (the attention, feed-forward and
projection layers of the UNet's transformer blocks and the text encoder's attention and MLP)
gets a slot: two zero matrices of the declared maximum rank beside its weights, applied as
`base(x) + up(down(x))` while adapters are on. Serving an adapter copies its weights into the
slots, scale folded in; several adapters sit side by side along the rank. The slots' shapes
never change, so the compiled graphs (and CUDA graphs, which read the slots by address) stay
valid: a LoRA batch runs compiled, and a plain batch only turns the slots off, unloading nothing.

Slots sit on the layers the model actually calls: with fused attention projections, one slot on
the fused query-key-value layer carries the adapter's query, key and value parts side by side,
so fused attention and adapters work together.
"""

import json
import logging
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from shared.loras import LoraRegistry
from worker.render_types import AdapterSet

log = logging.getLogger(__name__)

# Suffixes of an adapter layer's down (A) and up (B) weights, in the formats diffusers reads
# adapters into (PEFT, its own, and its legacy attention-processor names for kohya files).
_DOWN_SUFFIXES = (
    ".lora_A.weight",
    ".lora.down.weight",
    ".lora_linear_layer.down.weight",
    "_lora.down.weight",
)
_UP_SUFFIXES = (
    ".lora_B.weight",
    ".lora.up.weight",
    ".lora_linear_layer.up.weight",
    "_lora.up.weight",
)
# diffusers' legacy attention-processor names for a layer, and the layer's own.
_LEGACY_NAMES = {
    ".processor.to_q": ".to_q",
    ".processor.to_k": ".to_k",
    ".processor.to_v": ".to_v",
    ".processor.to_out": ".to_out.0",
    ".self_attn.to_q": ".self_attn.q_proj",
    ".self_attn.to_k": ".self_attn.k_proj",
    ".self_attn.to_v": ".self_attn.v_proj",
    ".self_attn.to_out": ".self_attn.out_proj",
}
_PREFIXES = ("unet", "text_encoder", "text_encoder_2")


class UnknownAdapter(Exception):
    """The registry holds no adapter of that name (the API checks names, so: removed since)."""


class UnsupportedAdapter(Exception):
    """The adapter does not fit the slots: layers they do not cover, or too high a rank."""


class _Switch:
    """Whether slots apply. One flag for every slot: the compiled UNet guards on it once, and
    holds one graph with slots and one without."""

    on = False


SLOTS = _Switch()


@dataclass(frozen=True)
class LayerDelta:
    """One layer of an adapter: its down and up matrices and the scale peft gives them."""

    down: torch.Tensor
    up: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up))


# An adapter's layers by module name, prefixed with "unet." or "text_encoder.".
Adapter = dict[str, LayerDelta]


class LoraSlot(nn.Module):
    """A linear (or 1x1 convolution) layer with a low-rank update beside it."""

    def __init__(self, base: nn.Module, parts: list[tuple[str, slice]], rank_per_part: int) -> None:
        super().__init__()
        weight = base.weight
        self.base = base
        self.conv = isinstance(base, nn.Conv2d)
        # Which adapter layers this slot carries, and where each one's output rows go.
        self.parts = parts
        rank = rank_per_part * len(parts)
        options = {"dtype": weight.dtype, "device": weight.device}
        self.register_buffer(
            "down", torch.zeros(rank, weight.shape[1], **options), persistent=False
        )
        self.register_buffer("up", torch.zeros(weight.shape[0], rank, **options), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if SLOTS.on:
            if self.conv:
                low = F.conv2d(x, self.down[:, :, None, None])
                return y + F.conv2d(low, self.up[:, :, None, None])
            return y + F.linear(F.linear(x, self.down), self.up)
        return y


def _layer_slots(
    root: nn.Module, prefix: str, module: nn.Module, path: str
) -> list[tuple[nn.Module, str, list[tuple[str, slice]]]]:
    """(parent, attribute, parts) for each layer of an attention module to put a slot on."""
    name = f"{prefix}.{path}"

    def rows(*names: str) -> list[tuple[str, slice]]:
        parts, start = [], 0
        for part in names:
            size = getattr(module, part).weight.shape[0]
            parts.append((f"{name}.{part}", slice(start, start + size)))
            start += size
        return parts

    def whole(attribute: str) -> list[tuple[str, slice]]:
        return [(f"{name}.{attribute}", slice(None))]

    slots = []
    if getattr(module, "fused_projections", False) and hasattr(module, "to_qkv"):
        slots.append((module, "to_qkv", rows("to_q", "to_k", "to_v")))
    elif getattr(module, "fused_projections", False) and hasattr(module, "to_kv"):
        slots.append((module, "to_q", whole("to_q")))
        slots.append((module, "to_kv", rows("to_k", "to_v")))
    else:
        slots.extend((module, part, whole(part)) for part in ("to_q", "to_k", "to_v"))
    to_out = module.to_out
    slots.append((to_out, "0", [(f"{name}.to_out.0", slice(None))]))
    return slots


def _slot_places(
    unet: nn.Module, text_encoders: dict[str, nn.Module]
) -> list[tuple[nn.Module, str, list]]:
    """Every layer the slots cover, as (parent, attribute, parts)."""
    places: list[tuple[nn.Module, str, list]] = []
    for path, module in unet.named_modules():
        kind = type(module).__name__
        if kind == "Transformer2DModel":
            for attribute in ("proj_in", "proj_out"):
                if isinstance(getattr(module, attribute, None), (nn.Linear, nn.Conv2d)):
                    places.append((module, attribute, [(f"unet.{path}.{attribute}", slice(None))]))
        elif kind == "Attention" and ".transformer_blocks." in f".{path}":
            places.extend(_layer_slots(unet, "unet", module, path))
        elif kind == "FeedForward":
            places.append((module.net[0], "proj", [(f"unet.{path}.net.0.proj", slice(None))]))
            places.append((module.net, "2", [(f"unet.{path}.net.2", slice(None))]))
    for encoder_name, text_encoder in text_encoders.items():
        for path, module in text_encoder.named_modules():
            kind = type(module).__name__
            if kind.endswith("Attention"):
                attributes: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
            elif kind.endswith("MLP"):
                attributes = ("fc1", "fc2")
            else:
                continue
            for attribute in attributes:
                part = f"{encoder_name}.{path}.{attribute}"
                places.append((module, attribute, [(part, slice(None))]))
    return places


def _set_child(parent: nn.Module, attribute: str, child: nn.Module) -> None:
    if isinstance(parent, (nn.ModuleList, nn.Sequential)):
        parent[int(attribute)] = child
    else:
        setattr(parent, attribute, child)


def _get_child(parent: nn.Module, attribute: str) -> nn.Module:
    if isinstance(parent, (nn.ModuleList, nn.Sequential)):
        return parent[int(attribute)]
    return getattr(parent, attribute)


def install_slots(
    unet: nn.Module, text_encoders: dict[str, nn.Module], max_rank: int
) -> list[LoraSlot]:
    """Put a slot on every layer adapters may target; call before the UNet is first compiled,
    after its projections are fused (or not)."""
    slots = []
    for parent, attribute, parts in _slot_places(unet, text_encoders):
        base = _get_child(parent, attribute)
        if isinstance(base, LoraSlot):
            slots.append(base)
            continue
        if isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1):
            continue
        slot = LoraSlot(base, parts, max_rank)
        _set_child(parent, attribute, slot)
        slots.append(slot)
    return slots


def _metadata_alphas(metadata: dict[str, str]) -> dict[str, float]:
    """Alphas from the adapter's metadata, where diffusers saved its peft configuration there."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    alphas: dict[str, float] = {}
    for key, config in json.loads(raw).items():
        # Keys are "unet.lora_alpha", "unet.alpha_pattern", ... per component.
        component, _, field = key.partition(".")
        if field == "lora_alpha":
            alphas[component] = float(config)
        elif field == "alpha_pattern" and isinstance(config, dict):
            for module, alpha in config.items():
                alphas[f"{component}.{module}"] = float(alpha)
    return alphas


def read_adapter(path: Path) -> Adapter:
    """An adapter file's layers, in any format diffusers reads (PEFT, diffusers, kohya/A1111)."""
    from diffusers import StableDiffusionPipeline

    # One read of the file: its tensors and its metadata.
    with safe_open(str(path), framework="pt") as handle:
        weights = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (a safetensors handle is not iterable)
        metadata = handle.metadata() or {}
    state, network_alphas = StableDiffusionPipeline.lora_state_dict(weights)
    alphas = {
        _layer_name(key.removesuffix(".alpha")): float(value)
        for key, value in (network_alphas or {}).items()
    }
    alphas.update(_metadata_alphas(metadata))
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    other: list[str] = []
    for key, tensor in state.items():
        down = next((s for s in _DOWN_SUFFIXES if key.endswith(s)), None)
        up = next((s for s in _UP_SUFFIXES if key.endswith(s)), None)
        if down is not None:
            downs[_layer_name(key)] = tensor
        elif up is not None:
            ups[_layer_name(key)] = tensor
        else:
            other.append(key)
    if other or set(downs) != set(ups):
        strays = other or sorted(set(downs) ^ set(ups))
        raise UnsupportedAdapter(
            f"adapter {path.name} has weights the slots cannot hold: {strays[:3]}"
        )
    adapter: Adapter = {}
    for module, down in downs.items():
        rank = down.shape[0]
        up = ups[module]
        alpha = alphas.get(module, alphas.get(module.split(".", 1)[0]))
        adapter[module] = LayerDelta(
            down=down.reshape(rank, -1),
            up=up.reshape(up.shape[0], -1),
            scaling=1.0 if alpha is None else alpha / rank,
        )
    return adapter


def _layer_name(key: str) -> str:
    """The name of the layer a weight (or alpha) key belongs to, with its component first
    (adapters without one are the UNet's)."""
    name = next(
        (
            key.removesuffix(suffix)
            for suffix in (*_DOWN_SUFFIXES, *_UP_SUFFIXES)
            if key.endswith(suffix)
        ),
        key,
    )
    for legacy, own in _LEGACY_NAMES.items():
        if name.endswith(legacy):
            name = name.removesuffix(legacy) + own
    return name if name.startswith(tuple(f"{p}." for p in _PREFIXES)) else f"unet.{name}"


class LoraSlots:
    """The slots of one pipeline and the adapters served through them: `activate` before each
    batch. Adapter files are read once into a least-recently-used cache bounded in bytes."""

    def __init__(
        self,
        unet: nn.Module,
        text_encoders: dict[str, nn.Module],
        registry: LoraRegistry,
        max_bytes: int,
        max_rank: int,
    ) -> None:
        self.registry = registry
        self.max_rank = max_rank
        self._max_bytes = max_bytes
        self._slots = install_slots(unet, text_encoders, max_rank)
        # Adapters name the text encoders' layers under `text_model.`, which transformers 5's
        # CLIP text models no longer have.
        self._flat_text_encoders = [
            name for name, encoder in text_encoders.items() if not hasattr(encoder, "text_model")
        ]
        self._by_part = {part: slot for slot in self._slots for part, _ in slot.parts}
        self._cached: OrderedDict[str, Adapter] = OrderedDict()
        self._cached_bytes = 0
        # The adapters (and scales) the slots hold now.
        self._loaded: AdapterSet = ()
        # Swaps of the slots' contents, for tests and logs.
        self.swaps = 0

    @property
    def cached(self) -> list[str]:
        """Adapters in the cache, least recently used first."""
        return list(self._cached)

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def use_registry(self, registry: LoraRegistry, max_bytes: int) -> None:
        """Serve another registry; the slots stay, the cache starts empty."""
        self.registry = registry
        self._max_bytes = max_bytes
        self._cached.clear()
        self._cached_bytes = 0
        self._loaded = ()

    def activate(self, adapters: AdapterSet) -> None:
        """Make the next render use exactly these adapters at these scales (none: slots off)."""
        if not adapters:
            SLOTS.on = False
            return
        if adapters != self._loaded:
            chosen = [(self._adapter(name), scale) for name, scale in adapters]
            # Until the slots are whole again they hold nothing anyone may reuse.
            self._loaded = ()
            self._fill(chosen)
            self._loaded = adapters
            self.swaps += 1
        SLOTS.on = True

    @contextmanager
    def on(self) -> Iterator[None]:
        """Slots on with whatever they hold: what warm-up compiles the LoRA graphs with."""
        SLOTS.on = True
        try:
            yield
        finally:
            SLOTS.on = False

    def _adapter(self, name: str) -> Adapter:
        if name in self._cached:
            self._cached.move_to_end(name)
            return self._cached[name]
        path = self.registry.path(name)
        if path is None:
            raise UnknownAdapter(f"no LoRA adapter named {name!r} in the registry")
        adapter = read_adapter(path)
        for encoder in self._flat_text_encoders:
            adapter = {
                layer_name.replace(f"{encoder}.text_model.", f"{encoder}.", 1): layer
                for layer_name, layer in adapter.items()
            }
        unknown = sorted(set(adapter) - set(self._by_part))
        if unknown:
            raise UnsupportedAdapter(
                f"LoRA adapter {name!r} targets layers the service's LoRA slots do not cover "
                f"(attention, feed-forward and projection layers of the UNet's transformer blocks "
                f"and the text encoder): {', '.join(unknown[:3])}"
            )
        self._cached[name] = adapter
        self._cached_bytes += sum(layer.nbytes for layer in adapter.values())
        while self._cached_bytes > self._max_bytes and len(self._cached) > 1:
            evicted, layers = self._cached.popitem(last=False)
            self._cached_bytes -= sum(layer.nbytes for layer in layers.values())
            log.info("LoRA adapter %s left the cache (%d bytes kept)", evicted, self._cached_bytes)
        log.info("LoRA adapter %s read from %s", name, path)
        return adapter

    def _fill(self, adapters: list[tuple[Adapter, float]]) -> None:
        """Write the adapters' layers into the slots, side by side along the rank. A slot with
        none of their layers is zeroed; every slot's rank is checked before any is written."""
        plans = []
        for slot in self._slots:
            pieces = []
            for part, rows in slot.parts:
                used = 0
                for adapter, scale in adapters:
                    layer = adapter.get(part)
                    if layer is None:
                        continue
                    rows_out = slot.up[rows].shape[0]
                    if layer.down.shape[1] != slot.down.shape[1] or layer.up.shape[0] != rows_out:
                        raise UnsupportedAdapter(
                            f"a LoRA adapter's {part} layer has the shape of another model's "
                            f"({tuple(layer.up.shape)} x {tuple(layer.down.shape)})"
                        )
                    pieces.append((rows, layer, scale))
                    used += layer.rank
                if used > self.max_rank:
                    raise UnsupportedAdapter(
                        f"these LoRA adapters together have rank {used} on {part}; the slots hold "
                        f"{self.max_rank} (T2I_LORA_MAX_RANK)"
                    )
            plans.append((slot, pieces))
        for slot, pieces in plans:
            down = torch.zeros_like(slot.down, device="cpu")
            up = torch.zeros_like(slot.up, device="cpu")
            start = 0
            for rows, layer, scale in pieces:
                end = start + layer.rank
                down[start:end] = layer.down.to(down.dtype)
                up[rows, start:end] = (layer.up.float() * (layer.scaling * scale)).to(up.dtype)
                start = end
            slot.down.copy_(down)
            slot.up.copy_(up)
