"""Mirroring: jobs files, the up-to-date check, the runner and the webhook."""
