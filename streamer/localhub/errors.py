"""Errors that map one-to-one onto the HTTP answers the Hub gives.

`huggingface_hub` turns responses into typed exceptions by looking at the status code and
at the `X-Error-Code` / `X-Error-Message` headers, so those must match what the Hub sends
for the client to raise the same exception it would raise against huggingface.co.
"""

from __future__ import annotations

# The exact wording matters: the client compares `X-Error-Message` against it to tell
# a bad token apart from a hidden repository (see `hf_raise_for_status`).
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


class HubError(Exception):
    """An error answer: status, JSON `{"error": message}` body and optional Hub error code."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.body = dict(body or {})  # extra JSON fields next to "error"


def repo_not_found(repo_id: str, *, authenticated: bool) -> HubError:
    # The Hub hides whether a private repo exists: anonymous callers get 401, others 404,
    # and in both cases the same code as for a repo that does not exist at all.
    return HubError(
        404 if authenticated else 401,
        "Repository not found",
        "RepoNotFound",
        {"X-Error-Message": "Repository not found"},
    )


def revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def entry_not_found(path: str, commit: str | None = None) -> HubError:
    headers = {"X-Repo-Commit": commit} if commit else None
    return HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)


def gated(repo_id: str, *, authenticated: bool) -> HubError:
    if authenticated:
        message = (
            f"Access to model {repo_id} is restricted and you are not in the authorized list. "
            f"Visit the repo page to ask for access."
        )
        return HubError(403, message, "GatedRepo", {"X-Error-Message": message})
    message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to access it."
    return HubError(401, message, "GatedRepo", {"X-Error-Message": message})


def invalid_credentials() -> HubError:
    return HubError(401, INVALID_CREDENTIALS, None, {"X-Error-Message": INVALID_CREDENTIALS})


def unauthorized(message: str = "You must be authenticated to do this") -> HubError:
    return HubError(401, message)


def forbidden(message: str) -> HubError:
    return HubError(403, message, None, {"X-Error-Message": message})


def bad_request(message: str) -> HubError:
    return HubError(400, message)


def conflict(message: str) -> HubError:
    return HubError(409, message)


def precondition_failed(message: str) -> HubError:
    return HubError(412, message)
