"""streamer: stream a Hugging Face checkpoint through a data-free quantizer into a
compressed-tensors checkpoint, reading only the bytes each job needs."""

__version__ = "0.1.0"

__all__ = ["__version__", "convert", "quantize", "model_free_ptq"]


def __getattr__(name):
    # The engine pulls in torch and compressed-tensors; import it only when it is used, so that
    # `streamer.localhub` and `--help` start fast.
    if name in ("convert", "quantize"):
        from . import api

        return getattr(api, name)
    if name == "model_free_ptq":
        from .compat import model_free_ptq

        return model_free_ptq
    raise AttributeError(f"module 'streamer' has no attribute {name!r}")
