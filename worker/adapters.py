"""LoRA adapters from the operator's registry on the warm pipeline, with diffusers' adapter
support (PEFT): each adapter file is read once into a least-recently-used cache bounded in bytes,
injected into the UNet (and text encoder) for the batches that ask for it, and weighted per batch
with `set_adapters`.

A batch without adapters first unloads every injected adapter: the UNet's original modules come
back, so a plain image is exactly the one it was before any adapter was loaded, and a UNet
compiled for plain batches keeps serving them without a recompile. Batches with adapters run the
UNet eager (an injected adapter changes the modules the compiled graphs were traced from).
"""

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from shared.loras import LoraRegistry

log = logging.getLogger(__name__)

# (name, scale) of each adapter of a batch, sorted by name: what jobs must share to batch.
AdapterSet = tuple[tuple[str, float], ...]


class UnknownAdapter(Exception):
    """The registry holds no adapter of that name (the API checks names, so: removed since)."""


class LoraAdapters:
    """The adapters a pipeline has loaded; `activate` before each batch."""

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        registry: LoraRegistry,
        max_bytes: int,
        set_unet_eager: Callable[[bool], None],
    ) -> None:
        self._pipeline = pipeline
        self._registry = registry
        self._max_bytes = max_bytes
        self._set_unet_eager = set_unet_eager
        # Adapter weights on the host, least recently used first.
        self._cached: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._cached_bytes = 0
        # Adapters injected into the pipeline's modules now.
        self._injected: set[str] = set()
        # The UNet's fused-QKV attention processors while adapters are in: LoRA layers sit on
        # the separate query, key and value projections, which fused attention does not call.
        self._fused_processors: dict[str, Any] | None = None

    @property
    def cached(self) -> list[str]:
        """Adapters in the cache, least recently used first."""
        return list(self._cached)

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def activate(self, adapters: AdapterSet) -> None:
        """Make the pipeline render with exactly these adapters at these scales."""
        if not adapters:
            self._unload_all()
            return
        names = [name for name, _ in adapters]
        weights = {name: self._weights(name) for name in names}
        self._drop_injected(exclude=set(names))
        if not self._injected:
            self._unfuse_qkv()
            self._set_unet_eager(True)
        try:
            for name in names:
                if name not in self._injected:
                    # diffusers consumes the dict it is given: a shallow copy keeps the cached one.
                    self._pipeline.load_lora_weights(dict(weights[name]), adapter_name=name)
                    self._injected.add(name)
            self._pipeline.set_adapters(names, adapter_weights=[scale for _, scale in adapters])
        except BaseException:
            # A file that fails half-way may leave layers behind: take every adapter out.
            self._unload_all(even_if_none_recorded=True)
            raise

    def _weights(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's weights, read from the registry unless cached; evicts the least
        recently used adapters beyond the byte bound (never the one just read)."""
        if name in self._cached:
            self._cached.move_to_end(name)
            return self._cached[name]
        path = self._registry.path(name)
        if path is None:
            raise UnknownAdapter(f"no LoRA adapter named {name!r} in the registry")
        weights = load_file(str(path))
        self._cached[name] = weights
        self._cached_bytes += _size(weights)
        while self._cached_bytes > self._max_bytes and len(self._cached) > 1:
            evicted, evicted_weights = self._cached.popitem(last=False)
            self._cached_bytes -= _size(evicted_weights)
            log.info("LoRA adapter %s left the cache (%d bytes kept)", evicted, self._cached_bytes)
        log.info("LoRA adapter %s read from %s", name, path)
        return weights

    def _drop_injected(self, exclude: set[str]) -> None:
        """Take out injected adapters that left the cache, so the device holds no more than the
        cache does (plus the batch's own)."""
        keep = exclude | set(self._cached)
        stale = [name for name in self._injected if name not in keep]
        if stale:
            self._pipeline.delete_adapters(stale)
            self._injected.difference_update(stale)

    def _unload_all(self, even_if_none_recorded: bool = False) -> None:
        if not self._injected and not even_if_none_recorded:
            return
        self._pipeline.unload_lora_weights()
        self._injected.clear()
        self._refuse_qkv()
        self._set_unet_eager(False)

    def _unfuse_qkv(self) -> None:
        unet = self._pipeline.unet
        if self._fused_processors is not None:
            return
        if getattr(unet, "original_attn_processors", None) is None:
            return
        self._fused_processors = unet.attn_processors
        unet.unfuse_qkv_projections()

    def _refuse_qkv(self) -> None:
        if self._fused_processors is not None:
            # The same processor objects: compiled graphs guarded on them stay valid.
            self._pipeline.unet.set_attn_processor(self._fused_processors)
            self._fused_processors = None


def _size(weights: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in weights.values())
