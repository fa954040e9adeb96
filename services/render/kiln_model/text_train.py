"""Train the kiln-text model: quoted text drawn legibly, on pictures Kiln draws itself.

    python -m services.render.kiln_model.text_train services/render/models/kiln-text --minutes 57

The shipped weights came from three runs (2 threads, batch 32): the autoencoder alone
(`--autoencoder-minutes 8 --minutes 0`, seed 0), checked by OCR; the UNet from scratch,
`--vae <folder>/vae --minutes 57` (seed 0, 1,117 steps: 83% of held-out words read exactly at
6 steps, guidance 1.5); then `--vae <folder>/vae --resume --lr 3e-4 --letter-weight 4
--seed 1 --minutes 18` (749 steps: 94% at 6 steps, guidance 1.5; 96% at 8). Resuming alone, without
the letter weight, read 88% (579 steps, 6 steps / guidance 1.5; the letter-weighted run read
94% there).

Glyph-conditioned latent diffusion (the GlyphControl / TextDiffuser recipe, small enough for
a CPU): the quoted text is drawn as a glyph mask (glyphs.py) and handed to the UNet as 16
extra input channels beside the latents; the caption, with the quoted text replaced by a
placeholder, reaches it through cross-attention and carries the colours. A tiny text encoder
is never asked to spell.

- 128×128 pictures: one line of twelve characters leaves ~10 px a character and ~12 px of
  cap height, about the least Tesseract reads reliably after the VAE; 64 px would leave 5.
- An `AutoencoderKL` that quarters each side (128×128×3 ↔ 32×32×8), trained first on crops
  around the text line. A factor of 8 would leave about one latent cell a letter; factor 4
  leaves two to three, and 8 latent channels (not SD's 4) keep the strokes of a 4×4 block.
- The glyph mask at full size, pixel-unshuffled by 4 into 16 channels at 32×32: lossless,
  where resizing the mask to the latent grid would blur the letters away.
- A small `UNet2DConditionModel` (in 8 + 16 channels, cross-attention at 16×16 and 8×8),
  v-prediction on a cosine schedule, caption dropout for classifier-free guidance (the
  glyphs are never dropped: guidance strengthens the colours, not the letters), EMA weights.

Checkpoints every `--save-every` minutes, so a cut-short run still leaves a usable model.
`--vae FOLDER` reuses a trained autoencoder and skips that stage; `--resume` (with `--vae`)
trains the folder's UNet and text encoder further; `--letter-weight` counts the latent cells
the letters cover that many times in the UNet's loss. Weights are saved in fp16.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from services.render.kiln_model import glyphs, text_scenes
from services.render.kiln_model.glyph_pipeline import encoder_caption, glyph_condition, glyph_masks
from services.render.kiln_model.train import (
    build_text_encoder,
    build_tokenizer,
    cell_weight,
    encode_text,
    latent_scaling,
    load_vae,
    resume_models,
    set_learning_rate,
    train_diffusion,
)
from services.render.pipeline import quiet_model_libraries

quiet_model_libraries()
import diffusers  # noqa: E402
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel  # noqa: E402

SIZE = 128  # see the docstring for why
FACTOR = 4  # VAE downsampling per side
LATENT_CHANNELS = 8
GLYPH_CHANNELS = FACTOR * FACTOR
TRAIN_STEPS = 1000  # noise levels
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.995
CROP = 64  # the autoencoder trains on 64×64 crops that hold part of the text line
BATCH_REUSE = (
    2  # UNet steps per drawn and encoded batch (new noise and times each): drawing and encoding cost ~40% of a step
)
TEXT_WEIGHT = 4.0  # extra weight of glyph pixels in the autoencoder loss: letters are ~10% of a picture

CARD = """\
# What this model draws, read by Kiln's services (shared/model_card.py); render loads the
# weights. The kiln-text model draws the quoted text of a prompt, legibly, in one colour on
# a plain background: 'a sign that says "OPEN" in red on a white background'.

# The square sides, in pixels, the model was trained for: one line of 12 characters needs 128.
sizes = [128]

# It draws quoted text (render calls GlyphPipeline with the cleaned quoted text): up to 12
# characters of A-Z, 0-9 and space (shared/quoted.py).
max_text_chars = 12

# How it draws, by `make model-check` (held-out words read by OCR): at 6 steps and
# guidance 1.5, 94 % of words exact and 99 % of characters (8 steps read 96 %, as many as
# the autoencoder's round trip of a clean picture reads, for a third more time; guidance 2
# smears colour into the letters). Context renders its pictures with at most these steps,
# at this guidance.
steps = 6
guidance = 1.5

# The words it knows besides the quoted text. The quoted text is the subject; words outside
# both lists are named back to the user instead of being drawn as something else.
[vocabulary]
subjects = []
words = [
    # colours (the first colours the letters; after "on", or before "sign", the background)
    "red", "orange", "yellow", "green", "blue", "purple", "white", "black",
    # the words captions are made of
    {words}
]
"""


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=SIZE,
        mid_block_add_attention=False,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SIZE // FACTOR,
        in_channels=LATENT_CHANNELS + GLYPH_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(48, 96, 128),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=128,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )


class Batches:
    """Endless batches of freshly drawn pictures: pixels in [-1, 1], glyph masks in [0, 1]
    and encoder captions. The sampler never draws a held-out word (text_scenes.random_text)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.rng = random.Random(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        pictures, texts, captions = [], [], []
        for _ in range(self.size):
            scene = text_scenes.random_scene(self.rng)
            prompt, _ = text_scenes.caption(scene, self.rng)
            pictures.append(
                torch.frombuffer(bytearray(text_scenes.draw(scene, (SIZE, SIZE)).tobytes()), dtype=torch.uint8)
            )
            texts.append(scene.text)
            captions.append("" if self.rng.random() < CAPTION_DROPOUT else encoder_caption(prompt))
        pixels = torch.stack(pictures).view(-1, SIZE, SIZE, 3).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return pixels, glyph_masks(texts, (SIZE, SIZE)), captions


def text_crops(pixels: torch.Tensor, masks: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """One CROP×CROP crop a picture that holds part of the text line (the line sits at mid
    height): a quarter of the pixels, most of the letters."""
    x = rng.randrange(0, SIZE - CROP + 1, FACTOR)
    y = rng.randrange(SIZE // 2 - CROP + 12, SIZE // 2 - 12 + 1, FACTOR)
    return pixels[..., y : y + CROP, x : x + CROP], masks[..., y : y + CROP, x : x + CROP]


def train_autoencoder(vae: AutoencoderKL, batches: Batches, minutes: float, seed: int) -> float:
    rng = random.Random(seed)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    budget_s, started, step = minutes * 60, time.monotonic(), 0
    while (elapsed := time.monotonic() - started) < budget_s:
        step += 1
        set_learning_rate(optimiser, 2e-3, step, 50, elapsed / budget_s)
        pixels, masks, _ = batches.next()
        pixels, masks = text_crops(pixels, masks, rng)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        weight = 1 + TEXT_WEIGHT * F.max_pool2d(masks, 3, 1, 1)  # the letters and their edges
        loss = (weight * (reconstruction - pixels) ** 2).mean() + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % 50 == 0:
            print(f"autoencoder step {step} ({elapsed / 60:.1f} min): loss {loss.item():.5f}", flush=True)
    vae.eval().requires_grad_(False)
    return loss.item()


def build_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        num_train_timesteps=TRAIN_STEPS,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        algorithm_type="dpmsolver++",
        solver_order=2,
        thresholding=True,
        sample_max_value=1.0,
        timestep_spacing="trailing",
    )


def save(folder: Path, tokenizer, text_encoder, vae, unet) -> None:
    """A diffusers-style folder, each part loadable with `from_pretrained`. model_index.json
    names GlyphPipeline: StableDiffusionPipeline cannot feed the glyph channels."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    for name, model in (("text_encoder", text_encoder), ("vae", vae), ("unet", unet)):
        copy.deepcopy(model).half().save_pretrained(folder / name, safe_serialization=True)
    build_scheduler().save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "GlyphPipeline",
        "_diffusers_version": diffusers.__version__,
        "_kiln_pipeline": "services.render.kiln_model.glyph_pipeline.GlyphPipeline",
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    colours = set(text_scenes.COLOURS)
    words = ", ".join(f'"{w}"' for w in text_scenes.WORDS if w not in colours)
    (folder / "kiln-model.toml").write_text(CARD.replace("{words}", words + ","))
    size_mb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
    print(f"saved {folder} ({size_mb:.1f} MB)", flush=True)


def train(
    folder: Path,
    minutes: float,
    batch_size: int,
    save_every: float,
    ae_minutes: float,
    vae_from: Path | None,
    seed: int,
    resume: bool = False,
    peak_lr: float = 1e-3,
    letters: float = 1.0,
) -> None:
    torch.manual_seed(seed)
    batches = Batches(batch_size, seed)
    tokenizer = build_tokenizer(text_scenes.WORDS)  # the words of its captions
    if resume:
        text_encoder, unet = resume_models(folder, tokenizer, build_text_encoder(tokenizer), build_unet())
        print(f"resuming the text encoder and UNet of {folder}", flush=True)
    else:
        text_encoder, unet = build_text_encoder(tokenizer), build_unet()
    print(
        f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, "
        f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M",
        flush=True,
    )

    # 1. The autoencoder: trained here, or an earlier run's reused
    if vae_from is not None:
        vae = load_vae(vae_from, build_vae())
        print(f"autoencoder from {vae_from}: latent scaling {vae.config.scaling_factor:.3f}", flush=True)
    else:
        vae = build_vae()
        loss = train_autoencoder(vae, Batches(16, seed + 1), ae_minutes, seed)
        vae.register_to_config(scaling_factor=latent_scaling(vae, batches, draws=4))  # type: ignore[arg-type]
        print(f"autoencoder done: loss {loss:.5f}, latent scaling {vae.config.scaling_factor:.3f}", flush=True)
        save(folder, tokenizer, text_encoder, vae, unet)
    scaling = vae.config.scaling_factor

    # 2. The UNet and text encoder, on latents of whole pictures, each drawn batch used for
    #    BATCH_REUSE steps, the glyphs joined to the noisy latents
    drawn: dict[str, object] = {}

    def inputs(step: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        if (step - 1) % BATCH_REUSE == 0:
            pixels, masks, captions = batches.next()
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.mode() * scaling
            drawn.update(
                latents=latents,
                condition=glyph_condition(masks, FACTOR),
                captions=captions,
                # the letters are ~10% of the latents: a plain MSE mostly teaches the background
                weight=cell_weight(masks, FACTOR, letters),
            )
        return drawn["latents"], drawn["condition"], drawn["captions"]  # type: ignore[return-value]

    train_diffusion(
        unet,
        text_encoder,
        lambda captions: encode_text(tokenizer, text_encoder, captions),
        inputs,
        minutes,
        save_every,
        lambda text_encoder, unet: save(folder, tokenizer, text_encoder, vae, unet),
        log_every=25,
        peak_lr=peak_lr,
        loss_weight=(lambda step: drawn["weight"]) if letters != 1.0 else None,  # type: ignore[arg-type,return-value]
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.render.kiln_model.text_train")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--minutes", type=float, default=57.0, help="diffusion training time")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    parser.add_argument("--autoencoder-minutes", type=float, default=8.0)
    parser.add_argument("--vae", type=Path, help="reuse this trained autoencoder (a vae/ folder)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resume", action="store_true", help="train the folder's UNet and text encoder further (with --vae)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (a resume wants less)")
    parser.add_argument(
        "--letter-weight", type=float, default=1.0, help="weight of the letters' latent cells in the UNet's loss"
    )
    args = parser.parse_args()
    if args.resume and args.vae is None:
        parser.error("--resume needs --vae: the UNet was trained on that autoencoder's latents")
    torch.set_num_threads(args.threads)
    glyphs.draw("KILN", SIZE, SIZE)  # fail early if the font cannot be drawn
    train(
        args.folder,
        args.minutes,
        args.batch,
        args.save_every,
        args.autoencoder_minutes,
        args.vae,
        args.seed,
        resume=args.resume,
        peak_lr=args.lr,
        letters=args.letter_weight,
    )


if __name__ == "__main__":
    main()
