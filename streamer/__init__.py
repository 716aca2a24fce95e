"""streamer: stream a Hugging Face checkpoint through a data-free quantizer into a
compressed-tensors checkpoint, reading only the bytes each job needs."""

__version__ = "0.1.0"

__all__ = ["__version__", "convert", "convert_many", "Target", "quantize", "model_free_ptq"]

# A public name must never be the name of a submodule: importing `streamer.X` sets the package
# attribute X to the module, so a function of that name would be replaced by it (tests/test_front_door.py).


def __getattr__(name):
    # The engine pulls in torch and compressed-tensors; import it only when it is used, so that
    # `streamer.localhub` and `--help` start fast. Once resolved, the function is cached on the
    # package so later lookups skip this hook.
    if name in ("convert", "convert_many", "Target", "quantize"):
        from streamer.engine import convert as engine

        value = getattr(engine, name)
    elif name == "model_free_ptq":
        from streamer.compat import model_free_ptq as value
    else:
        raise AttributeError(f"module 'streamer' has no attribute {name!r}")
    globals()[name] = value
    return value
