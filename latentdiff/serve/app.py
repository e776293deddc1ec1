"""The page (gradio Blocks): a pipeline picker showing its record, the request fields (whose initial values are
the picked pipeline's defaults), image to image and inpainting, and a gallery that keeps this visit's results
with their parameters and their PNGs to download.

Generations wait in gradio's queue and run one at a time (and one at a time per pipeline: its lock), so two
visitors cannot interleave on a pipeline; each image still comes from its own seed's generator. Cancel stops
the running generation at its next step. Errors a visitor can cause are shown in the status line, as the CLI
words them; anything else is logged on the server and shown as one line.
"""
from __future__ import annotations

import re
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..errors import ConfigError, LatentDiffError
from ..samplers import SAMPLERS
from .picker import PipelineCatalog, describe
from .render import MODES, Cancelled, Fields, drawn_mask, read_upload, render

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
KEEP = 200  # results a visit's gallery keeps (newest first); the PNGs stay on disk
CSS = "#gallery img { image-rendering: pixelated; }"  # small images enlarged: their pixels, not a blur


@dataclass(frozen=True)
class ServeSettings:
    out: Path                  # where the PNGs go
    max_memory: int | None     # bytes a request may need (None: the device's memory)
    max_upload: int            # bytes an uploaded file may have


def escape(text: str) -> str:
    """Plain text for a Markdown component (paths and names hold _ and *)."""
    return re.sub(r"([\\`*_{}\[\]<>#|])", r"\\\1", text)


def error(message: str) -> str:
    return f"**error:** {escape(message)}"


def pipeline_fields(catalog: PipelineCatalog, folder: str) -> tuple:
    """(record Markdown, sampler, steps, guidance, width, height): the pipeline's own defaults, or its load
    error and no change to the fields."""
    try:
        pipe = catalog.get(folder).pipe
    except LatentDiffError as err:
        return (error(str(err)),) + (gr.update(),) * 5
    _, _, h, w = pipe.latent_shape(1, None, None)
    f, sampling = pipe.autoencoder.downsample_factor, pipe.sampling
    return describe(pipe), sampling.sampler, sampling.steps, f"{sampling.guidance_scale:g}", w * f, h * f


def build_app(catalog: PipelineCatalog, settings: ServeSettings) -> gr.Blocks:
    jobs: dict[str, threading.Event] = {}  # session -> its generation's cancel flag
    first = catalog.folders[0]
    info, *defaults = pipeline_fields(catalog, first)
    # a dict is gr.update(): the first pipeline could not be loaded, the fields start blank
    sampler, steps, guidance, width, height = (None if isinstance(v, dict) else v for v in defaults)

    with gr.Blocks(title="latentdiff", analytics_enabled=False) as demo:
        gr.Markdown("## latentdiff: generate, compare and keep images")
        picker = gr.Dropdown(catalog.folders, value=first, label="pipeline", elem_id="pipeline")
        record = gr.Markdown(info, elem_id="record")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="negative prompt", elem_id="negative")
                with gr.Row():
                    sampler_box = gr.Dropdown(list(SAMPLERS), value=sampler, label="sampler",
                                              allow_custom_value=True, elem_id="sampler")
                    steps_box = gr.Number(steps, label="steps", precision=0, elem_id="steps")
                    guidance_box = gr.Textbox(guidance, label="guidance", elem_id="guidance")
                with gr.Row():
                    seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                    random_seed = gr.Checkbox(True, label="random seed", elem_id="random-seed")
                    count = gr.Number(1, label="images", precision=0, elem_id="count")
                with gr.Row():
                    width_box = gr.Number(width, label="width", precision=0, elem_id="width")
                    height_box = gr.Number(height, label="height", precision=0, elem_id="height")
                with gr.Accordion("image to image and inpainting", open=False):
                    mode = gr.Radio(list(MODES), value=MODES[0], label="mode", elem_id="mode")
                    strength = gr.Textbox(label="strength, 0 to 1 (blank: the pipeline's default)",
                                          elem_id="strength")
                    upload = gr.File(label="image", file_types=["image"], type="filepath", elem_id="image-upload")
                    editor = gr.ImageEditor(type="pil", sources=[], label="paint the area to repaint",
                                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), elem_id="editor")
                    mask_upload = gr.File(label="or upload a mask (white = repaint)", file_types=["image"],
                                          type="filepath", elem_id="mask-upload")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", elem_id="cancel")
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(label="results (newest first)", columns=4, elem_id="gallery")
                files = gr.File(label="download: the PNGs, with their parameters", file_count="multiple",
                                elem_id="downloads")
        kept = gr.State([])

        def generate(folder, prompt, negative, sampler, steps, guidance, seed, random_seed, count, width, height,
                     mode, strength, upload, editor, mask_upload, kept, request: gr.Request,
                     progress=gr.Progress()):
            flag = jobs.setdefault(request.session_hash, threading.Event())
            start = time.perf_counter()
            try:
                if flag.is_set():
                    raise Cancelled("cancelled before it started")
                entry = catalog.get(folder)
                fields = Fields(prompt or "", negative or "", sampler, steps, guidance or "", seed, random_seed,
                                count, width, height, mode, strength or "", upload,
                                drawn_mask(editor and editor.get("layers")), mask_upload)
                made = render(entry, fields, settings.out, memory_limit=settings.max_memory,
                              max_upload=settings.max_upload, cancelled=flag.is_set,
                              on_step=lambda i, n: progress((i, n), desc=f"step {i} of {n}" if n else f"step {i}"))
            except (LatentDiffError, Cancelled) as err:
                return error(str(err)) if isinstance(err, LatentDiffError) else escape(str(err)), kept, None, kept
            except Exception as err:  # a bug, not the visitor's: the trace goes to the server's log
                traceback.print_exc()
                return error(f"internal error ({type(err).__name__}: {err}); the details are in the server's log"), \
                    kept, None, kept
            finally:
                jobs.pop(request.session_hash, None)
            kept = (made + kept)[:KEEP]
            done = (f"{len(made)} image(s) in {time.perf_counter() - start:.1f} s with {escape(folder)}, "
                    f"written to {escape(str(settings.out))}/")
            return done, kept, [path for path, _ in made], kept

        def queue_job(request: gr.Request):
            jobs[request.session_hash] = threading.Event()
            return "queued..."

        def cancel(request: gr.Request):  # the generation reports where it stopped (no output here: no race)
            if request.session_hash in jobs:
                jobs[request.session_hash].set()

        def load_image(path):
            """Show an uploaded image in the editor; refuse (and drop) a file that is not one."""
            if not path:
                return None, gr.update(), gr.update()
            try:
                return read_upload(path, "image", settings.max_upload).convert("RGB"), "", gr.update()
            except LatentDiffError as err:
                return None, error(str(err)), None

        picker.change(lambda folder: pipeline_fields(catalog, folder), picker,
                      [record, sampler_box, steps_box, guidance_box, width_box, height_box])
        upload.change(load_image, upload, [editor, status, upload], show_progress="hidden")
        seed.input(lambda: False, None, random_seed)  # a typed seed is meant to be used
        inputs = [picker, prompt, negative, sampler_box, steps_box, guidance_box, seed, random_seed, count, width_box,
                  height_box, mode, strength, upload, editor, mask_upload, kept]
        gr.on([go.click, prompt.submit], queue_job, None, status, queue=False, show_progress="hidden").then(
            generate, inputs, [status, gallery, files, kept], concurrency_limit=1, show_progress_on=gallery)
        stop.click(cancel, None, None, queue=False, show_progress="hidden")
    return demo


def serve(catalog: PipelineCatalog, settings: ServeSettings, host: str, port: int) -> None:
    """Start the page and block until interrupted."""
    settings.out.mkdir(parents=True, exist_ok=True)
    demo = build_app(catalog, settings).queue()
    try:
        demo.launch(server_name=host, server_port=port, quiet=True, prevent_thread_lock=True, ssr_mode=False, css=CSS,
                    allowed_paths=[str(settings.out.resolve())], max_file_size=settings.max_upload)
    except OSError:  # gradio's message names its own environment variables, not our flags
        raise ConfigError(f"cannot listen on {host}:{port}: the port is in use or the address is not this "
                          f"machine's; pass another --port or --host") from None
    where = "this machine only" if host in LOCAL_HOSTS else "every machine that can reach this address"
    print(f"latentdiff serve: http://{host}:{port} ({where}; --host sets it), "
          f"{len(catalog.folders)} pipeline(s), PNGs in {settings.out}/; Ctrl+C stops", flush=True)
    try:
        demo.block_thread()  # until Ctrl+C
    finally:
        demo.close()
