"""GPU throughput of the render service, on a full-size SD 1.5-shaped model.

It measures two things at each batch size (1, 2, 4, 8 and 16 by default):
- the service's render path (`Renderer.render_batch`, PNG encoding included) against a plain
  diffusers call on the same model, batch size and steps: the ratio of their images/s;
- what batching pays: the service's images/s at batch B divided by its images/s at batch 1.

No weights are downloaded. The model is built from SD 1.5's configs with random weights and
saved to a temporary folder, which both paths load; speed does not depend on weight values.
Each configuration gets one warm-up call per path. Then plain and service runs alternate, so
drift hits both, and the median of the repeats counts.

    bash bench/gpu.sh                       # on a fresh GPU machine: sets up .venv, runs this
    python -m bench.gpu [--size 512] [--steps 20] [--batches 1 2 4 8 16] [--repeats 3]
    python -m bench.gpu --tiny              # a tiny model on the CPU, to check the script

Results go to bench/results/gpu.json; --tiny writes bench/results/gpu-tiny.json and a full
model on a machine without CUDA writes gpu-cpu.json, so neither overwrites the GPU figures.
"""

from __future__ import annotations

import argparse
import json
import platform as host
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.render.pipeline import Renderer, quiet_model_libraries
from shared.events import RenderRequested
from shared.settings import Settings

RESULTS = Path(__file__).parent / "results"
PROMPT = "a red clay teapot on a wooden table, soft window light"
GUIDANCE = 7.5

# SD 1.5's component configs (runwayml/stable-diffusion-v1-5), written out because nothing
# can be downloaded on the GPU machine.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_VAE = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
)
# CLIP ViT-L/14's text tower. Token ids follow the byte-level vocab built in `clip_tokenizer`.
SD15_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    vocab_size=49408,
    projection_dim=768,
    hidden_act="quick_gelu",
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
# The same kinds of blocks, as small as they go: a check of the script, not a figure.
TINY_UNET = SD15_UNET | dict(
    sample_size=32,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
)
TINY_VAE = SD15_VAE | dict(
    sample_size=64,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)
TINY_TEXT = SD15_TEXT | dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
)


def clip_tokenizer(folder: Path) -> Any:
    """A CLIP tokenizer without downloaded files: every byte is a token and there are no
    merges, so prompts tokenize to more (but valid) ids. Costs the same after truncation to
    77 tokens, which is all the text encoder sees."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    merges_file.write_text("#version: 0.2\n")
    # The pipeline pads and truncates prompts to this; SD 1.5's tokenizer says 77 too.
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)


def save_random_pipeline(folder: Path, tiny: bool, dtype: Any) -> None:
    """Build an SD 1.5-shaped pipeline with random weights and save it where `Renderer` and
    the plain pipeline both load it from."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet_config, vae_config, text_config = (
        (TINY_UNET, TINY_VAE, TINY_TEXT) if tiny else (SD15_UNET, SD15_VAE, SD15_TEXT)
    )
    with tempfile.TemporaryDirectory() as vocab_folder:
        tokenizer = clip_tokenizer(Path(vocab_folder))
        if text_config["vocab_size"] < len(tokenizer):
            raise ValueError(f"`vocab_size` must be at least {len(tokenizer)} but is {text_config['vocab_size']}")
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**vae_config),
            text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
            tokenizer=tokenizer,
            unet=UNet2DConditionModel(**unet_config),
            # SD 1.5's scheduler settings.
            scheduler=DDIMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                clip_sample=False,
                set_alpha_to_one=False,
                steps_offset=1,
            ),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        # Stored in the dtype it is loaded in: half the bytes to write and read on a GPU.
        pipe.to(dtype=dtype).save_pretrained(folder, safe_serialization=True)


def load_plain(folder: Path, device: str, dtype: Any) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    # The service disables its progress bars too; a bar redrawn each step is not rendering.
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render_jobs(batch: int, size: int, steps: int) -> list[RenderRequested]:
    return [
        RenderRequested(
            request_id=f"bench-{i}",
            user_id="bench",
            prompt=PROMPT,
            width=size,
            height=size,
            steps=steps,
            seed=i,
            guidance=GUIDANCE,
        )
        for i in range(batch)
    ]


def timed(call: Callable[[], Any], sync: Callable[[], None]) -> tuple[float, Any]:
    """Seconds one call took, and what it returned. CUDA runs asynchronously: without the
    syncs the clock would stop before the GPU has finished."""
    sync()
    started = time.perf_counter()
    result = call()
    sync()
    return time.perf_counter() - started, result


def measure_batch(
    plain: Any, renderer: Renderer, batch: int, size: int, steps: int, repeats: int, sync: Callable[[], None]
) -> dict[str, Any]:
    import torch

    device = renderer.device
    jobs = render_jobs(batch, size, steps)

    def plain_call() -> Any:
        return plain(
            prompt=[PROMPT] * batch,
            num_inference_steps=steps,
            width=size,
            height=size,
            guidance_scale=GUIDANCE,
            generator=[torch.Generator(device).manual_seed(i) for i in range(batch)],
        ).images

    def service_call() -> tuple[list[bytes], float]:
        return renderer.render_batch(jobs, lambda done, total: None, sources=(), masks=())

    # Warm-up: kernel selection, allocator growth and lazy initialisation stay out of the figures.
    timed(plain_call, sync)
    timed(service_call, sync)
    plain_s: list[float] = []
    service_s: list[float] = []
    service_render_s: list[float] = []
    for repeat in range(repeats):
        # Who goes first swaps every repeat, so neither path always runs on a cooler GPU.
        for which in ("plain", "service") if repeat % 2 == 0 else ("service", "plain"):
            if which == "plain":
                seconds, _ = timed(plain_call, sync)
                plain_s.append(seconds)
            else:
                seconds, (_, render_ms) = timed(service_call, sync)
                service_s.append(seconds)
                service_render_s.append(render_ms / 1000)

    def rate(seconds: list[float]) -> float:
        return statistics.median(batch / s for s in seconds)

    return {
        "batch": batch,
        "plain_images_per_s": rate(plain_s),
        "service_images_per_s": rate(service_s),
        # The service's own `render_ms`: the pipeline call without PNG encoding.
        "service_pipeline_images_per_s": rate(service_render_s),
        "plain_s": plain_s,
        "service_s": service_s,
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    single = next((row for row in rows if row["batch"] == 1), None)
    for row in rows:
        row["service_over_plain"] = row["service_images_per_s"] / row["plain_images_per_s"]
        row["speedup_vs_batch_1"] = row["service_images_per_s"] / single["service_images_per_s"] if single else None
        row["plain_speedup_vs_batch_1"] = row["plain_images_per_s"] / single["plain_images_per_s"] if single else None


def print_table(result: dict[str, Any]) -> None:
    config = result["config"]
    print(
        f"{result['device']}, torch {result['torch']}, {config['model']} model, "
        f"{config['size']}x{config['size']}, {config['steps']} steps, median of {config['repeats']}"
    )
    print(f"  {'batch':>5}  {'plain img/s':>11}  {'service img/s':>13}  {'service/plain':>13}  {'vs batch 1':>10}")
    for row in result["batches"]:
        speedup = f"{row['speedup_vs_batch_1']:.2f}x" if row["speedup_vs_batch_1"] is not None else "-"
        print(
            f"  {row['batch']:>5}  {row['plain_images_per_s']:>11.3f}  {row['service_images_per_s']:>13.3f}"
            f"  {row['service_over_plain']:>13.3f}  {speedup:>10}"
        )


def quiet_benchmark_warnings() -> None:
    """Warnings that say nothing about the figures, so the table stays readable."""
    from diffusers.utils import logging as diffusers_logging

    # Load-time advice (install accelerate, keep some modules in fp32): loading is not timed.
    diffusers_logging.set_verbosity_error()
    # `torch_dtype` is what the Renderer passes too; the plain pipeline is loaded the same way.
    warnings.filterwarnings("ignore", "`torch_dtype` is deprecated", FutureWarning)
    # Random weights can decode to NaN pixels in fp16; numpy warns on casting them to bytes.
    warnings.filterwarnings("ignore", "invalid value encountered in cast", RuntimeWarning)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes: a CPU check of the script")
    parser.add_argument("--size", type=int, help="width and height (default 512; 64 with --tiny)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 20; 4 with --tiny)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 2 4 8 16; 1 2 4 with --tiny)")
    parser.add_argument("--repeats", type=int, help="timed runs per path and batch size (default 3; 1 with --tiny)")
    args = parser.parse_args(argv)
    defaults = (
        dict(size=64, steps=4, batches=[1, 2, 4], repeats=1)
        if args.tiny
        else dict(size=512, steps=20, batches=[1, 2, 4, 8, 16], repeats=3)
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.size % 8:
        parser.error(f"--size must be divisible by 8 but is {args.size}")
    if args.steps < 1 or args.repeats < 1 or min(args.batches) < 1:
        parser.error(
            f"--steps, --repeats and --batches must be at least 1 but are {args.steps}, "
            f"{args.repeats} and {args.batches}"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings.from_env()
    # Before transformers is imported: no import-time warnings, no progress bars.
    quiet_model_libraries()
    import torch

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.tiny and not cuda:
        # A check of the script, not a figure: one thread keeps it quick beside other work on
        # the machine (OpenMP threads waiting for busy cores made it about 15 times slower).
        torch.set_num_threads(1)
    quiet_benchmark_warnings()

    with tempfile.TemporaryDirectory(prefix="kiln-bench-gpu-") as folder:
        model = Path(folder) / ("sd15-shaped-tiny" if args.tiny else "sd15-shaped")
        save_random_pipeline(model, args.tiny, dtype)
        plain = load_plain(model, device, dtype)
        # KILN_RENDER_THREADS caps the CPU threads, as it does for a render worker.
        renderer = Renderer(model, settings.render_threads)
        if renderer.device != device:
            raise RuntimeError(f"the plain pipeline runs on {device} but the Renderer on {renderer.device}")
        rows = [
            measure_batch(plain, renderer, batch, args.size, args.steps, args.repeats, sync) for batch in args.batches
        ]
    add_ratios(rows)

    result = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({host.processor() or host.machine()})",
        "torch": torch.__version__,
        "config": {
            "model": "tiny SD 1.5-shaped" if args.tiny else "SD 1.5-shaped",
            "weights": "random",
            "dtype": str(dtype).removeprefix("torch."),
            "size": args.size,
            "steps": args.steps,
            "guidance": GUIDANCE,
            "scheduler": "DDIM",
            "batches": args.batches,
            "repeats": args.repeats,
            "statistic": "median images/s; service figures include PNG encoding",
        },
        "batches": rows,
    }
    print_table(result)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("gpu-tiny.json" if args.tiny else "gpu.json" if cuda else "gpu-cpu.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
