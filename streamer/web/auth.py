"""Who is asking: the token sent on a visitor's behalf, and the account (and namespaces) behind it."""

from __future__ import annotations

import hashlib
import html
import threading
import time
from dataclasses import dataclass

import gradio as gr
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from streamer.io.hub_http import explain, hub_call, hub_endpoint
from streamer.web import settings
from streamer.web.wording import UserError, error_box, fail, sentence


def resolve_token(oauth_token: gr.OAuthToken | None) -> str | bool | None:
    """The token to send for this visitor: the OAuth one, else (off Spaces) HF_TOKEN / the login
    cache. On a Space a signed-out visitor gets False, never None: huggingface_hub replaces a None
    token with the environment's HF_TOKEN (the Space's own secret), False sends no token at all.
    Every Hub call made for a visitor (config fetch, source, plan, convert) takes this value.

    oauth_token: what gradio passes for the signed-in visitor (None when signed out)."""
    token = getattr(oauth_token, "token", None)
    if token and token != settings.MOCK_TOKEN:
        return token
    if settings.ON_SPACES and not settings.ALLOW_SERVER_TOKEN:
        return False  # never the Space's own token on behalf of an anonymous visitor
    return get_token()


def require_token(oauth_token: gr.OAuthToken | None) -> str:
    """The visitor's token (as resolve_token), or a UserError telling them to sign in.

    oauth_token: what gradio passes for the signed-in visitor (None when signed out)."""
    token = resolve_token(oauth_token)
    if not token:
        if settings.ON_SPACES:
            raise UserError("Sign in with Hugging Face first (the button at the top of the page).")
        raise UserError("No Hugging Face token here: set HF_TOKEN or run `hf auth login` where the app runs, then reload.")
    return token


@dataclass(frozen=True)
class Account:
    """A Hub account: its user name and the organizations it belongs to."""

    name: str
    orgs: tuple[str, ...]

    @property
    def namespaces(self) -> list[str]:
        """Where the account may publish: its own name first, then its organizations."""
        return [self.name, *self.orgs]


_WHOAMI_TTL = 300.0
_whoami_cache: dict[str, tuple[float, Account]] = {}  # sha256(token) -> (when, account)
_whoami_lock = threading.Lock()


def whoami(token: str) -> Account:
    """The token's account (cached a few minutes: the Hub rate-limits whoami).

    token: the visitor's Hugging Face token."""
    key = hashlib.sha256(token.encode()).hexdigest()
    now = time.monotonic()
    with _whoami_lock:
        hit = _whoami_cache.get(key)
    if hit is not None and now - hit[0] < _WHOAMI_TTL:
        return hit[1]
    account = _ask_whoami(token)
    with _whoami_lock:
        if len(_whoami_cache) > 4096:
            _whoami_cache.clear()
        _whoami_cache[key] = (now, account)
    return account


def forget_accounts() -> None:
    """Drop every cached account, so that the next whoami asks the Hub again."""
    with _whoami_lock:
        _whoami_cache.clear()


def _ask_whoami(token: str) -> Account:
    endpoint = hub_endpoint()
    try:
        info = hub_call("checking your sign-in (whoami)", HfApi(endpoint=endpoint, token=token).whoami, where=endpoint)
    except HfHubHTTPError as e:
        if getattr(e.response, "status_code", None) == 401:
            raise UserError(
                "Your Hugging Face sign-in was rejected (expired or revoked): sign out and sign in again."
                if settings.ON_SPACES else "The Hugging Face token was rejected (invalid or expired): set a valid HF_TOKEN."
            ) from None
        raise explain(e, "your account") from None
    orgs = tuple(o.get("name") for o in info.get("orgs") or [] if isinstance(o, dict) and o.get("name"))
    return Account(str(info.get("name")), orgs)


def on_load(oauth_token: gr.OAuthToken | None = None):
    """The page's first request: who is signed in (a line of Markdown), and the namespaces they
    may publish to (an update of the namespace picker).

    oauth_token: what gradio passes for the signed-in visitor (None when signed out)."""
    token = resolve_token(oauth_token)
    if not token:
        msg = ("Sign in with Hugging Face to convert models: they are published under your account."
               if settings.ON_SPACES else "No Hugging Face token found: set HF_TOKEN or run `hf auth login`, then reload.")  # fmt: skip
        return msg, gr.update(choices=[], value=None)
    try:
        account = whoami(token)
    except Exception as e:
        return error_box(sentence(e)), gr.update(choices=[], value=None)
    how = "" if getattr(oauth_token, "token", None) not in (None, settings.MOCK_TOKEN) else " (token of this machine)"
    where = "" if hub_endpoint() == "https://huggingface.co" else f" on {hub_endpoint()}"
    orgs = f" · organizations: {', '.join(account.orgs)}" if account.orgs else ""
    return (
        f"Signed in as **{html.escape(account.name)}**{how}{html.escape(where)}{html.escape(orgs)}",
        gr.update(choices=account.namespaces, value=account.namespaces[0]),
    )


def whoami_api(oauth_token: gr.OAuthToken | None = None) -> dict:
    """The /whoami endpoint: {"name": ..., "namespaces": [...]} of the caller.

    oauth_token: what gradio passes for the signed-in caller (None when signed out)."""
    try:
        account = whoami(require_token(oauth_token))
    except Exception as e:
        raise fail(e) from None
    return {"name": account.name, "namespaces": account.namespaces}
