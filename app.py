"""streamer as a Hugging Face Space: quantize a Hub model and publish it, for the signed-in user.

Run it on a workstation (the token comes from HF_TOKEN or `hf auth login`):

    python app.py                                   # against huggingface.co
    HF_ENDPOINT=http://127.0.0.1:8765 HF_TOKEN=hf_alice python app.py   # against a localhub

HF_ENDPOINT is read by huggingface_hub when it is imported, so it must be set in the environment
before this module is imported (the commands above do). On a Space (`hf_oauth: true` in
space/README.md) every user signs in with Hugging Face and conversions run with that user's own
token; the Space's own secrets are never used on a user's behalf.

Endpoints (for gradio_client): /whoami, /suggest, /plan, /convert, /cancel.
"""

from __future__ import annotations

import logging

from huggingface_hub.utils import disable_progress_bars

from streamer.web import settings
from streamer.web.layout import CSS, build_demo

# A Space runs this file and serves the `demo` it finds here.
demo = build_demo()


def main() -> None:
    """Serve the app (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT choose where), logging to stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    disable_progress_bars()  # huggingface_hub's tqdm bars belong to a terminal, not a server log
    demo.queue(default_concurrency_limit=settings.MAX_CONVERSIONS, max_size=settings.QUEUE_SIZE)
    demo.launch(css=CSS, show_error=True, footer_links=["api", "gradio"])


if __name__ == "__main__":
    main()
