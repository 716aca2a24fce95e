"""The app's settings, read once from the environment when it starts.

Every module of streamer.web reads them as `settings.NAME` at call time (never `from … import`),
so that a test can change one with `monkeypatch.setattr(settings, "ON_SPACES", True)`.
"""

from __future__ import annotations

import os

# On a Space, gradio runs the real OAuth flow; elsewhere there is no sign-in and the token of
# the machine (HF_TOKEN / the login cache) is used, which is what a workstation or localhub wants.
ON_SPACES = bool(os.environ.get("SPACE_ID"))
# A Space that deliberately converts with its own token for everyone (a private Space) says so.
ALLOW_SERVER_TOKEN = os.environ.get("STREAMER_ALLOW_SERVER_TOKEN") == "1"
# gradio's stand-in token when OAuth is mocked off Spaces: worthless, never sent anywhere.
MOCK_TOKEN = "mock-oauth-token-for-local-dev"

MAX_CONVERSIONS = max(1, int(os.environ.get("STREAMER_MAX_CONVERSIONS", "2")))  # at once, all users
QUEUE_SIZE = int(os.environ.get("STREAMER_QUEUE_SIZE", "64"))  # requests waiting, all endpoints
DEFAULT_SCHEME = os.environ.get("STREAMER_DEFAULT_SCHEME", "FP8_DYNAMIC")
CONFIG_MAX_BYTES = 4 << 20  # config.json is a few kB; anything bigger is not a config
