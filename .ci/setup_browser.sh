#!/usr/bin/env bash
# Headless Chromium for the Space's browser test (tests/test_app.py), from Debian's packages.
#
# Idempotent: does nothing when /usr/bin/chromium runs. Never downloads a browser build of its
# own (no `playwright install`): the test launches /usr/bin/chromium through Playwright's
# executable_path. Runs non-interactively as root (CI); elsewhere it uses sudo when needed.
# Also makes sure the active Python has the `playwright` package (normally installed by the
# project's test extra; this is only a fallback).
set -euo pipefail

CHROMIUM=/usr/bin/chromium
export DEBIAN_FRONTEND=noninteractive

runs() { "$CHROMIUM" --version >/dev/null 2>&1; }

if [ -x "$CHROMIUM" ] && runs; then
    echo "chromium ready: $("$CHROMIUM" --version 2>/dev/null)"
else
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
            echo "setup_browser: need root (or sudo) to apt-get install chromium" >&2; exit 1
        fi
    fi
    $SUDO apt-get update -qq </dev/null
    $SUDO apt-get install -y -qq chromium </dev/null >/dev/null
    if ! runs; then
        echo "setup_browser: $CHROMIUM does not run after installing chromium" >&2
        exit 1
    fi
    echo "chromium installed: $("$CHROMIUM" --version 2>/dev/null)"
fi

PY="${PYTHON:-python}"
if command -v "$PY" >/dev/null 2>&1 && ! "$PY" -c "import playwright.sync_api" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "playwright>=1.49,<2" </dev/null
fi
