"""Build a tiny, randomly initialised Stable Diffusion pipeline and save it to a folder.

It draws noise-like pictures, not what the prompt says, but it runs the real diffusers
code path (tokenizer → text encoder → UNet denoising loop → VAE decode) on a CPU in well
under a second, which is what the foundation and the tests need. A trained model of
Kiln's own replaces it later by configuration (`KILN_MODEL`).

    python -m services.render.tiny_model .kiln/models/tiny-sd
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.render.pipeline import quiet_model_libraries

SEED = 0
NATIVE_SIZE = 32


def _byte_level_vocab() -> dict[str, int]:
    """A CLIP tokenizer over single bytes with no merges: the smallest valid vocabulary
    (every character becomes its own token)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    return {token: index for index, token in enumerate(tokens)}


def build(folder: Path) -> Path:
    quiet_model_libraries()
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(SEED)
    tokenizer = CLIPTokenizer(vocab=_byte_level_vocab(), merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=NATIVE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=NATIVE_SIZE,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def ensure(folder: Path) -> Path:
    """Build the model into `folder` unless a pipeline is already there."""
    if not (folder / "model_index.json").exists():
        build(folder)
    return folder


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".kiln/models/tiny-sd")
    print(f"tiny model saved to {ensure(target)}")
