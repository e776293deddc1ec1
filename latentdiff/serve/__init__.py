"""`latentdiff serve`: a local web page to generate, compare and keep images (Gradio, the `ui` extra).

    pip install -e ".[ui]"
    latentdiff serve                                    # the pipelines under weights/, on http://127.0.0.1:7860
    latentdiff serve --pipeline sd15 --port 8000        # and a converted SD pipeline folder

The page translates its fields into `Text2ImagePipeline.request` (pipeline.py), which fills in the
pipeline's defaults and refuses what cannot work with the same messages as `latentdiff generate`; its PNGs
are the ones `latentdiff generate` writes, so `latentdiff generate --from-png` re-renders them.

This module only declares the command: gradio is imported when the command runs (app.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError

DEFAULT_WEIGHTS = "weights"
DEFAULT_OUT = "outputs"
DEFAULT_MAX_UPLOAD = "20MB"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", action="append", default=[], metavar="DIR",
                        help="a pipeline or diffusion run folder to offer besides those under --weights (repeatable)")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS, metavar="DIR",
                        help="offer every pipeline folder in this folder (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 shares the "
                             "page with your network)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where the page writes its PNGs (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    parser.add_argument("--max-memory", metavar="SIZE",
                        help="refuse requests estimated to need more memory than this, e.g. 4GiB "
                             "(default: the device's memory)")
    parser.add_argument("--max-upload", default=DEFAULT_MAX_UPLOAD, metavar="SIZE",
                        help="largest image file a visitor may upload (default: %(default)s)")


def run_serve(args: argparse.Namespace) -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ConfigError('the web page needs the ui extra: pip install -e ".[ui]" (or pip install gradio)') from None
    from ..request_limits import parse_bytes
    from .app import ServeSettings, serve
    from .picker import PipelineCatalog

    catalog = PipelineCatalog.discover(args.weights, args.pipeline, args.device)
    settings = ServeSettings(out=Path(args.out), max_memory=args.max_memory and parse_bytes(args.max_memory),
                             max_upload=parse_bytes(args.max_upload))
    serve(catalog, settings, host=args.host, port=args.port)
