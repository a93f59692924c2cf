"""An adapter's rank and the layers the workers' LoRA slots do not cover, read from real
safetensors files in each format adapters ship in, and the registry's checks built on them."""

import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from shared.errors import ServiceError
from shared.loras import (
    AdapterLayout,
    AdapterModel,
    LoraRegistry,
    adapter_layout,
    adapter_model,
    slot_covers,
)
from shared.schema import LoraSpec

BLOCK = "down_blocks.0.attentions.0"
KOHYA_BLOCK = "lora_unet_down_blocks_0_attentions_0"
TEXT_LAYER = "text_model.encoder.layers.0"


def _pair(module: str, rank: int, down: str, up: str, width: int = 32) -> dict[str, np.ndarray]:
    return {
        f"{module}.{down}": np.zeros((rank, width), np.float16),
        f"{module}.{up}": np.zeros((width, rank), np.float16),
    }


def peft(module: str, rank: int) -> dict[str, np.ndarray]:
    return _pair(module, rank, "lora_A.weight", "lora_B.weight")


def old_diffusers(module: str, rank: int) -> dict[str, np.ndarray]:
    return _pair(module, rank, "lora.down.weight", "lora.up.weight")


def kohya(module: str, rank: int) -> dict[str, np.ndarray]:
    alpha = {f"{module}.alpha": np.array(rank / 2, np.float32)}
    return {**_pair(module, rank, "lora_down.weight", "lora_up.weight"), **alpha}


def written(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def layout_of(tmp_path: Path, tensors: dict[str, np.ndarray]) -> AdapterLayout:
    return adapter_layout(written(tmp_path / "adapter.safetensors", tensors))


def test_a_peft_unet_adapter_has_its_largest_rank_and_nothing_unsupported(tmp_path: Path) -> None:
    tensors = {
        **peft(f"unet.{BLOCK}.transformer_blocks.0.attn1.to_q", 8),
        **peft(f"unet.{BLOCK}.transformer_blocks.0.attn2.to_out.0", 8),
        **peft(f"unet.{BLOCK}.transformer_blocks.0.ff.net.0.proj", 8),
        **peft(f"unet.{BLOCK}.transformer_blocks.0.ff.net.2", 8),
        **peft(f"unet.{BLOCK}.proj_in", 16),
        **peft("unet.mid_block.attentions.0.proj_out", 4),
    }
    assert layout_of(tmp_path, tensors) == AdapterLayout(rank=16, unsupported=())


def test_an_old_diffusers_adapter_without_a_unet_prefix_is_read(tmp_path: Path) -> None:
    tensors = {
        **old_diffusers(f"{BLOCK}.transformer_blocks.0.attn1.to_k", 4),
        **old_diffusers("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v", 4),
    }
    assert layout_of(tmp_path, tensors) == AdapterLayout(rank=4, unsupported=())


def test_an_attention_processor_adapter_of_early_diffusers_is_read(tmp_path: Path) -> None:
    tensors = {
        **old_diffusers(f"unet.{BLOCK}.transformer_blocks.0.attn1.processor.to_q", 4),
        **old_diffusers(f"unet.{BLOCK}.transformer_blocks.0.attn1.processor.to_out", 4),
        **old_diffusers(f"text_encoder.{TEXT_LAYER}.self_attn.to_v", 2),
    }
    renamed = {key.replace(".lora.", "_lora."): value for key, value in tensors.items()}
    assert layout_of(tmp_path, renamed) == AdapterLayout(rank=4, unsupported=())


def test_a_kohya_adapter_with_alphas_covers_unet_and_text_encoder(tmp_path: Path) -> None:
    tensors = {
        **kohya(f"{KOHYA_BLOCK}_transformer_blocks_0_attn1_to_q", 32),
        **kohya(f"{KOHYA_BLOCK}_transformer_blocks_0_attn1_to_out_0", 32),
        **kohya(f"{KOHYA_BLOCK}_transformer_blocks_0_ff_net_0_proj", 32),
        **kohya(f"{KOHYA_BLOCK}_proj_in", 32),
        **kohya("lora_te_text_model_encoder_layers_11_self_attn_out_proj", 8),
        **kohya("lora_te_text_model_encoder_layers_11_mlp_fc1", 8),
    }
    assert layout_of(tmp_path, tensors) == AdapterLayout(rank=32, unsupported=())


def test_a_text_encoder_adapter_is_covered(tmp_path: Path) -> None:
    tensors = {
        **peft(f"text_encoder.{TEXT_LAYER}.self_attn.q_proj", 12),
        **peft(f"text_encoder.{TEXT_LAYER}.self_attn.k_proj", 12),
        **peft(f"text_encoder.{TEXT_LAYER}.mlp.fc2", 6),
    }
    assert layout_of(tmp_path, tensors) == AdapterLayout(rank=12, unsupported=())


def test_a_locon_adapter_names_the_convolutions_the_slots_do_not_cover(tmp_path: Path) -> None:
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = {
        **kohya(f"{KOHYA_BLOCK}_transformer_blocks_0_attn2_to_k", 16),
        f"{conv}.lora_down.weight": np.zeros((24, 320, 3, 3), np.float16),
        f"{conv}.lora_up.weight": np.zeros((320, 24, 1, 1), np.float16),
        f"{conv}.alpha": np.array(12, np.float32),
        **kohya("lora_unet_conv_in", 8),
        **kohya("lora_unet_time_embedding_linear_1", 8),
        **kohya("lora_unet_down_blocks_0_downsamplers_0_conv", 8),
    }
    assert layout_of(tmp_path, tensors) == AdapterLayout(
        rank=24,
        unsupported=(
            "lora_unet_conv_in",
            "lora_unet_down_blocks_0_downsamplers_0_conv",
            conv,
            "lora_unet_time_embedding_linear_1",
        ),
    )


def test_dora_and_lycoris_weights_are_unsupported(tmp_path: Path) -> None:
    to_q = f"unet.{BLOCK}.transformer_blocks.0.attn1.to_q"
    tensors = {
        **peft(to_q, 8),
        f"{to_q}.lora_magnitude_vector": np.ones(32, np.float16),
        f"{KOHYA_BLOCK}_proj_out.hada_w1_a": np.zeros((32, 4), np.float16),
    }
    assert layout_of(tmp_path, tensors).unsupported == (
        f"{KOHYA_BLOCK}_proj_out.hada_w1_a",
        f"{to_q}.lora_magnitude_vector",
    )


def test_a_file_that_is_not_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "picture.safetensors"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(ValueError, match="not a safetensors file"):
        adapter_layout(path)
    path.write_bytes(b"tiny")
    with pytest.raises(ValueError, match="not a safetensors file"):
        adapter_layout(path)


def test_a_safetensors_file_without_lora_weights_is_refused(tmp_path: Path) -> None:
    path = written(tmp_path / "unet.safetensors", {"conv_in.weight": np.zeros((4, 4), np.float16)})
    with pytest.raises(ValueError, match="holds no LoRA weights"):
        adapter_layout(path)


def test_a_layout_is_read_once_until_the_file_changes(tmp_path: Path) -> None:
    block = f"unet.{BLOCK}.transformer_blocks.0.attn1"
    path = written(tmp_path / "adapter.safetensors", peft(f"{block}.to_q", 4))
    assert adapter_layout(path).unsupported == ()
    stat = path.stat()
    path.write_bytes(path.read_bytes().replace(b".to_q.", b".to_x."))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # The same size and time: only the cache can still say that nothing is unsupported.
    assert adapter_layout(path).unsupported == ()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert adapter_layout(path).unsupported == (f"{block}.to_x",)


@pytest.mark.parametrize(
    "module",
    [
        f"{BLOCK}.transformer_blocks.0.attn1.to_q",
        f"unet.{BLOCK}.transformer_blocks.1.attn2.to_out.0",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
        f"{KOHYA_BLOCK}_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_up_blocks_3_attentions_2_proj_out",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_v",
        f"text_encoder.{TEXT_LAYER}.self_attn.v_proj",
        "lora_te_text_model_encoder_layers_3_mlp_fc2",
    ],
)
def test_the_slots_cover_attention_feed_forward_and_projection_layers(module: str) -> None:
    assert slot_covers(module)


@pytest.mark.parametrize(
    "module",
    [
        "down_blocks.0.resnets.0.conv1",
        "lora_unet_conv_in",
        "time_embedding.linear_1",
        "lora_unet_down_blocks_1_downsamplers_0_conv",
        f"{BLOCK}.transformer_blocks.0.norm1",
        f"{BLOCK}.transformer_blocks.0.attn1.to_out.1",
        "text_encoder.text_model.embeddings.token_embedding",
        "lora_te_text_projection",
    ],
)
def test_the_slots_do_not_cover_other_layers(module: str) -> None:
    assert not slot_covers(module)


@pytest.fixture
def registry(tmp_path: Path) -> LoraRegistry:
    attention = f"unet.{BLOCK}.transformer_blocks.0.attn1.to_q"
    written(tmp_path / "small.safetensors", peft(attention, 16))
    written(tmp_path / "large.safetensors", peft(attention, 48))
    written(tmp_path / "locon.safetensors", kohya("lora_unet_conv_in", 8))
    (tmp_path / "broken.safetensors").write_text("not an adapter")
    return LoraRegistry(tmp_path)


def refusal(registry: LoraRegistry, names: list[str], max_rank: int = 64) -> dict:
    with pytest.raises(ServiceError) as refused:
        registry.check([LoraSpec(name=name) for name in names], max_rank)
    assert refused.value.status_code == 422
    [detail] = refused.value.details
    return {"message": refused.value.message, **detail}


def test_the_listing_gives_each_adapters_rank(registry: LoraRegistry) -> None:
    listed = {lora.name: lora.rank for lora in registry.listing().data}
    assert listed == {"broken": None, "large": 48, "locon": 8, "small": 16}


def test_adapters_whose_ranks_fit_pass(registry: LoraRegistry) -> None:
    registry.check([LoraSpec(name="small"), LoraSpec(name="large")], max_rank=64)


def test_each_refusal_says_which_adapter_and_why(registry: LoraRegistry) -> None:
    unknown = refusal(registry, ["small", "nope"])
    assert (unknown["type"], unknown["loc"]) == ("lora_unknown", ["body", "loras", 1, "name"])
    invalid = refusal(registry, ["broken"])
    assert (invalid["type"], invalid["loc"]) == ("lora_invalid", ["body", "loras", 0, "name"])
    assert "not a safetensors file" in invalid["message"]
    unsupported = refusal(registry, ["small", "locon"])
    assert unsupported["type"] == "lora_unsupported"
    assert unsupported["loc"] == ["body", "loras", 1, "name"]
    assert "lora_unet_conv_in" in unsupported["message"]
    assert "transformer blocks" in unsupported["message"]


def test_ranks_add_up_against_the_slots_rank(registry: LoraRegistry) -> None:
    too_large = refusal(registry, ["small", "large"], max_rank=63)
    assert (too_large["type"], too_large["loc"]) == ("lora_rank_too_large", ["body", "loras"])
    assert too_large["ctx"] == {"ranks": {"small": 16, "large": 48}, "max_rank": 63}
    assert "small: 16, large: 48" in too_large["message"]
    assert "64" in too_large["message"] and "63" in too_large["message"]
    assert "T2I_LORA_MAX_RANK" in too_large["message"]
    alone = refusal(registry, ["large"], max_rank=32)
    assert "'large' has rank 48, more than the 32" in alone["message"]


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        # Diffusers (PEFT) names: the key/value layers' in-features; attn1 and the query do not
        # count.
        (
            {
                **peft(f"unet.{BLOCK}.transformer_blocks.0.attn1.to_k", 4),
                **_pair(
                    f"unet.{BLOCK}.transformer_blocks.0.attn2.to_k",
                    4,
                    "lora_A.weight",
                    "lora_B.weight",
                    768,
                ),
            },
            AdapterModel(768, second_text_encoder=False),
        ),
        # Kohya names, SDXL's second text encoder among them.
        (
            {
                **_pair(
                    f"{KOHYA_BLOCK}_transformer_blocks_0_attn2_to_v",
                    4,
                    "lora_down.weight",
                    "lora_up.weight",
                    2048,
                ),
                **kohya("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 4),
            },
            AdapterModel(2048, second_text_encoder=True),
        ),
        # Early diffusers' processor names, and an adapter of the text encoder only.
        (
            _pair(
                f"unet.{BLOCK}.transformer_blocks.0.attn2.processor",
                4,
                "to_k_lora.down.weight",
                "to_k_lora.up.weight",
            )
            | peft(f"text_encoder_2.{TEXT_LAYER}.self_attn.q_proj", 4),
            AdapterModel(32, second_text_encoder=True),
        ),
        (peft(f"text_encoder.{TEXT_LAYER}.self_attn.q_proj", 4), AdapterModel(None, False)),
    ],
)
def test_an_adapter_tells_the_model_it_was_made_for(
    tmp_path: Path, tensors: dict[str, np.ndarray], expected: AdapterModel
) -> None:
    assert adapter_model(written(tmp_path / "adapter.safetensors", tensors)) == expected
