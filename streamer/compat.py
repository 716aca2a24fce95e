"""`model_free_ptq` with llm-compressor's signature, running streamer's engine underneath.

Switching is one import:

    from streamer import model_free_ptq        # was: from llmcompressor import model_free_ptq

It is a thin wrapper over `streamer.engine.convert.convert`, so the output is exactly what
`python -m streamer` writes for the same arguments, with one difference the drop-in owes to the
reference: streamer's default ignore policy (embeddings, lm_head, MoE routers and vision/audio
towers kept unquantized) is off, as the reference has none; the conversion logs one warning
naming what it quantizes that serving engines do not expect quantized.

On a compressed-tensors source (a previous model_free_ptq's output) the calls stack as the
reference's do: modules the scheme does not target are kept as stored and config.json declares
both quantizations. Passing a converter (a source-format name or an llm-compressor dequantizer)
expands every quantized weight instead, as the reference's dequantizers do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch

from streamer.engine.convert import Result, convert
from streamer.errors import StreamerError
from streamer.formats import HUB_PREFIX
from streamer.io.locations import check_not_url

log = logging.getLogger("streamer")


# Source formats the reference needs a converter for; streamer reads them from config.json.
_CONVERTER_NAMES = {"auto", "fp8", "fp8-block", "fp8_block", "compressed-tensors", "compressed_tensors"}
_CONVERTER_CLASSES = {"FP8BlockDequantizer", "CompressedTensorsDequantizer"}


def model_free_ptq(
    model_stub: str | os.PathLike,
    save_directory: str | os.PathLike,
    scheme=None,
    config=None,
    ignore: Iterable[str] = (),
    max_workers: int = 1,
    device: str | torch.device | list | None = None,
    converter=None,
    *,
    token: str | None = None,
    private: bool = False,
    create_pr: bool = False,
) -> Result:
    """Quantize a checkpoint without a model definition, like llm-compressor's model_free_ptq.

    :param model_stub: a Hub repo id (`org/name[@revision]`) or a local folder.
    :param save_directory: a local folder, as in the reference; `hub://org/name` publishes to
        that Hub repo instead (streamed, one commit, nothing written locally).
    :param scheme: a compressed-tensors preset name or a QuantizationScheme (not with config).
    :param config: a compressed-tensors QuantizationConfig (not with scheme).
    :param ignore: module names or `re:` patterns left unquantized.
    :param max_workers: pieces of work in flight at once.
    :param device: "cpu", "cuda", "cuda:N" or a list of them (the first is used), None for auto.
    :param converter: None or "auto": the source format is detected from config.json, and on
        a compressed-tensors source what the scheme does not target is kept as stored (stacked);
        a source-format name / llm-compressor dequantizer: every quantized weight is expanded.
    :param token: the Hugging Face token for a Hub source or target (default: HF_TOKEN or the
        saved login); not in the reference.
    :param private: create a `hub://` target repo private; not in the reference.
    :param create_pr: publish to a `hub://` target as a pull request; not in the reference.

    Returns streamer's `Result` (the plan, run statistics, where it was written).
    """
    if scheme is not None and config is not None:
        raise StreamerError("Please specify either `config` or `scheme`, not both")
    stack = _check_converter(converter)
    target = os.fspath(save_directory)
    check_not_url(target, "save_directory")
    if target.startswith(HUB_PREFIX):
        if target[len(HUB_PREFIX) :].count("/") != 1:
            raise StreamerError(f"save_directory {target!r}: use hub://org/name")
        dst = target  # hub:// kept: a Hub repo even where a folder of that name exists
    else:
        # A plain string is always a folder here, even "org/name": the reference's meaning.
        dst = os.path.abspath(target)
    return convert(
        os.fspath(model_stub),
        dst,
        scheme=scheme,
        config=config,
        ignore=list(ignore),
        device=_device(device),
        workers=max(1, int(max_workers)),
        token=token,
        private=private,
        create_pr=create_pr,
        # the reference's semantics, bit for bit: only `ignore` is kept unquantized
        default_ignore=False,
        record="effective",
        stack=stack,
    )


def _device(device) -> str:
    if device is None:
        return "auto"
    if isinstance(device, (list, tuple)):
        if not device:
            raise StreamerError("The device list cannot be empty.")
        if len(device) > 1:
            log.info("streamer quantizes on one device; using %s", device[0])
        device = device[0]
    return str(device)


def _check_converter(converter) -> bool:
    """Whether to stack on a quantized source (no converter, as the reference without one)
    rather than expand it (a converter, as the reference's dequantizers do)."""
    if converter is None or (isinstance(converter, str) and converter.lower() == "auto"):
        return True
    if isinstance(converter, str) and converter.lower() in _CONVERTER_NAMES:
        return False
    if type(converter).__name__ in _CONVERTER_CLASSES:
        return False  # streamer dequantizes these formats itself, detected from config.json
    raise StreamerError(
        f"converter {converter!r} is not supported: streamer detects FP8-block (DeepSeek) and "
        "compressed-tensors sources from config.json; pass converter=None or 'auto'"
    )
