"""streamer: stream a Hugging Face checkpoint through a data-free quantizer into a
compressed-tensors checkpoint, reading only the bytes each job needs."""

__version__ = "0.1.0"

from .api import convert, quantize  # noqa: E402

__all__ = ["__version__", "convert", "quantize", "model_free_ptq"]


def __getattr__(name):
    # model_free_ptq pulls in the drop-in wrapper only when asked for.
    if name == "model_free_ptq":
        from .compat import model_free_ptq

        return model_free_ptq
    raise AttributeError(name)
