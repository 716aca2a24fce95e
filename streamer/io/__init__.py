"""Bytes in and out: sources, sinks and the Hub, local folders alike."""
