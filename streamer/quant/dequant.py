"""Sources that are already quantized: expand them to dense weights on the fly, per job.

Many of the largest models ship only quantized. Instead of writing a dense copy first, the plan
treats each quantized weight as the dense ``<module>.weight`` it stands for: the job reads the
stored tensors it is made of (FP8 data and block scales, packed integers and group scales …),
:meth:`Dequantizer.dense` rebuilds the dense weight in memory, and the pipeline quantizes that to
the target scheme. The dense model never exists in full, anywhere. The source's scale tensors are
consumed (never copied to the output), its ``quantization_config`` is replaced by the recipe's,
and tensors the source left unquantized pass through byte for byte.

Two source formats are understood, detected from ``config.json``:

* ``quant_method: fp8`` with ``weight_block_size`` (DeepSeek-V3/R1 and every model saved with
  transformers' FineGrainedFP8): ``X.weight`` F8 + ``X.weight_scale_inv`` (⌈out/bh⌉, ⌈in/bw⌉).
  The math is compressed-tensors' ``FP8BlockDequantizer``: ``(w.float() * s.float()).to(dtype)``
  with each block's scale broadcast over the block (edge blocks simply cover fewer elements).
* ``quant_method: compressed-tensors``: every format compressed-tensors itself decompresses
  (pack-quantized INT4/INT8, float-quantized FP8, int-quantized, nvfp4 / mxfp4 / mxfp8 …), with
  the library's own decompressor (:func:`streamer.quant.kernels.dequantize_weight`), as its
  ``CompressedTensorsDequantizer`` does. Which modules are quantized follows the config's groups
  (targets) and ignore list, checked against the tensors actually stored.

Stacking (compressed-tensors sources): a module the source holds quantized that the recipe does
not target (after its ignore list) is **kept as stored**: its tensors pass through byte for byte
and its config group is carried into the output's ``quantization_config`` beside the recipe's,
as llm-compressor's ``model_free_ptq`` does when it runs on its own output. Only the modules the
recipe targets are expanded and re-quantized; re-quantizing to the scheme they already have is
refused unless ``force``. With ``stack=False`` (the drop-in given a converter, as the reference
with a dequantizer) every quantized weight is expanded, and what the recipe does not target is
written dense. FP8-block sources are always expanded: their format is not compressed-tensors.

The result is cast to the dtype the source declares (``dtype`` / ``torch_dtype`` in config.json,
bfloat16 when it declares none or a non-float one), or to the ``dequant_dtype`` asked for.

A dense source has a dequantizer too, :class:`PassThrough`, which reads every tensor as it is
stored: the plan and the pipeline call the :class:`Dequantizer` protocol and never ask whether
the source was quantized.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from streamer.errors import Hint, PlanError, SchemeError, StreamerError
from streamer.formats import DEQUANT_DTYPES, FLOAT_DTYPES, collapse_names, torch_dtype
from streamer.io.catalog import Catalog, TensorInfo

_FP8_STORED = ("F8_E4M3", "F8_E5M2")
_FLOAT_STORED = FLOAT_DTYPES | {"F64"}  # a weight stored dense
SUPPORTED = "fp8 with weight_block_size (DeepSeek-V3 style) and compressed-tensors"
# Quantization parameters of attention (kv cache) quantization: meaningless once the target
# recipe (data-free, no kv cache scheme) replaces the config; dropped like the reference does.
_KV_PARAMS = ("k_scale", "v_scale", "q_scale")
# Row chunk of the FP8 block expansion on CPU (elements): keeps fp32 temporaries cache-sized.
_CPU_CHUNK = 1 << 20
# A dequantized weight holds its dense copy plus the quantizer's temporaries (about three times
# the dense size, like pipeline.WORK_FACTOR), none of which its stored bytes show.
DENSE_WORK_FACTOR = 4


# ----------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------


def source_dtype_name(config: dict | None) -> str:
    """The dense dtype CONFIG (a config.json) declares (`dtype` / `torch_dtype`, nested text
    config included) when it is one a source can be dequantized to, else "bfloat16"."""
    cfgs = [config or {}]
    if isinstance((config or {}).get("text_config"), dict):
        cfgs.append(config["text_config"])
    for cfg in cfgs:
        for key in ("dtype", "torch_dtype"):
            val = str(cfg.get(key) or "").removeprefix("torch.")
            if val in DEQUANT_DTYPES:
                return val
    return "bfloat16"


def detect_dequantizer(
    catalog: Catalog, recipe, *, dtype: str | None = None, force: bool = False, stack: bool = True
) -> Dequantizer:
    """The Dequantizer of a source: one that expands a quantized source's weights, or
    :class:`PassThrough` for a dense one (reads config.json only).

    catalog: the source's catalog (its config.json and tensor names are read); recipe: the
    conversion's Recipe; dtype: the dense dtype to expand to ("bfloat16", "float16", "float32";
    None: the one the source declares); force: re-quantize weights that already have the recipe's
    scheme; stack: keep the compressed-tensors modules the recipe does not target as stored (see
    the module docstring); False expands all.

    Raises SchemeError for a quantization format streamer cannot expand, and when the source
    already has the recipe's scheme (unless ``force``).
    """
    config = catalog.config or {}
    qc = config.get("quantization_config")
    if qc is None:
        if config.get("compression_config") is not None:
            raise SchemeError(
                "config.json holds a legacy `compression_config` (compressed-tensors < 0.5); "
                "this source format is not supported: supported quantized sources are "
                f"{SUPPORTED}"
            )
        _refuse_unlabelled(catalog)
        return PassThrough()
    if not isinstance(qc, dict):
        raise SchemeError(f"config.json: quantization_config must be an object, found {type(qc).__name__}")
    if dtype is not None and dtype not in DEQUANT_DTYPES:
        raise SchemeError(
            f"cannot dequantize to {dtype!r}: the choices are {', '.join(DEQUANT_DTYPES)}",
            hints=(Hint("dequant_dtype", tuple(DEQUANT_DTYPES)),),
        )
    dtype_name = dtype or source_dtype_name(config)
    method = str(qc.get("quant_method") or "").lower()
    if method == "fp8" and qc.get("weight_block_size") is not None:
        dq = FP8BlockDequantizer(qc, dtype_name)
    elif method == "compressed-tensors":
        dq = CompressedTensorsDequantizer(qc, dtype_name, recipe=recipe if stack else None, force=force)
    else:
        what = f"quant_method {method!r}" if method else "a quantization_config without quant_method"
        if method == "fp8":
            what = "quant_method 'fp8' without weight_block_size (per-tensor FP8)"
        raise SchemeError(
            f"the source is already quantized ({what} in config.json) and streamer cannot "
            f"dequantize that format; supported quantized sources: {SUPPORTED}. Convert a dense "
            "(bf16/fp16) checkpoint of the model instead"
        )
    if not force and not dq.stacking:  # stacking checks each targeted module instead (_find)
        same = dq.same_scheme_as(recipe)
        if same:
            raise SchemeError(
                f"the source is already quantized with {same}, which is what {recipe.name} "
                "writes: nothing to convert",
                hints=(Hint("force"),),
            )
    return dq


def _refuse_unlabelled(catalog: Catalog) -> None:
    """Quantized tensors in a checkpoint whose config.json does not say how they were made."""
    for name in catalog.tensors:
        leaf = name.rpartition(".")[2]
        if leaf in ("weight_scale_inv", "weight_packed"):
            raise SchemeError(
                f"tensor {name!r} looks quantized but config.json has no quantization_config, "
                "so streamer cannot tell how to dequantize it: add the source's "
                "quantization_config (supported: " + SUPPORTED + ")"
            )


# ----------------------------------------------------------------------------------------------
# the dequantizer interface make_plan and the pipeline use
# ----------------------------------------------------------------------------------------------


class Dequantizer(Protocol):
    """What the plan and the pipeline ask of a source's dequantizer; every source has one.

    Tensor names are the plan's: a quantized weight goes by its dense name `<module>.weight`.
    """

    kind: str  # "dense", "fp8-block" or "compressed-tensors"
    dtype_name: str | None  # the dense dtype quantized weights are expanded to; None: dense source
    stacking: bool  # keeps the quantized modules the recipe does not target as stored
    kept: dict[str, str]  # module kept as stored -> the source's config group (stacking)
    ignore: list[str]  # the source's own quantization_config ignore list

    def plan_inputs(self, by_name: dict[str, TensorInfo]) -> tuple[dict[str, TensorInfo], set[str]]:
        """(name -> info with each quantized weight as its dense self, names consumed).

        by_name: every stored tensor (3-D experts already split) by name. Consumed names are the
        stored tensors only read to rebuild a dense weight (scales, packed data …)."""
        ...

    def keeps(self, module: str) -> bool:
        """Whether MODULE is kept quantized as the source stores it (stacking)."""
        ...

    def kept_groups(self) -> dict[str, object]:
        """The source's config groups that still describe stored modules, in source order."""
        ...

    def keep_stored(self, quantized: set[str]) -> bool:
        """The plan quantizes only the dense weights named in QUANTIZED: keep the other weights
        this dequantizer would expand as the source stores them, instead of writing them dense.
        True when that changed anything (the plan is then made again)."""
        ...

    def dense_dtype(self, name: str) -> str:
        """The safetensors dtype of tensor NAME once read (dense weights: the expanded dtype)."""
        ...

    def shard_of(self, name: str) -> str:
        """The source file that places tensor NAME (its output goes to the shard of that name)."""
        ...

    def inputs_for(self, name: str) -> list[TensorInfo]:
        """The stored tensors read to produce tensor NAME."""
        ...

    def transforms(self, name: str) -> bool:
        """Whether tensor NAME is rebuilt from stored quantized tensors (else read as stored)."""
        ...

    def work_bytes(self, name: str) -> int:
        """Working memory NAME needs beyond its stored bytes, for the pipeline's byte budget."""
        ...

    def dense(self, name: str, raw: dict, device: torch.device) -> torch.Tensor:
        """Tensor NAME as a torch tensor on DEVICE, from RAW: the fetched bytes of a piece, a
        uint8 tensor per stored tensor keyed by TensorInfo.key."""
        ...

    def describe(self) -> str | None:
        """How the source is expanded, for the plan and the model card; None for a dense one."""
        ...


class PassThrough:
    """The Dequantizer of a dense source: every tensor is read as it is stored."""

    kind = "dense"
    dtype_name = None
    stacking = False

    def __init__(self):
        self.kept: dict[str, str] = {}
        self.ignore: list[str] = []
        self._stored: dict[str, TensorInfo] = {}

    def plan_inputs(self, by_name: dict[str, TensorInfo]) -> tuple[dict[str, TensorInfo], set[str]]:
        """BY_NAME as it is, nothing consumed (see Dequantizer.plan_inputs)."""
        self._stored = dict(by_name)
        return by_name, set()

    def keeps(self, module: str) -> bool:
        """Never: a dense source has nothing stored quantized (MODULE: any module name)."""
        return False

    def kept_groups(self) -> dict[str, object]:
        """None: a dense source has no config groups."""
        return {}

    def keep_stored(self, quantized: set[str]) -> bool:
        """Nothing to keep (QUANTIZED: the weights the plan quantizes)."""
        return False

    def dense_dtype(self, name: str) -> str:
        """The stored dtype of tensor NAME."""
        return self._stored[name].dtype

    def shard_of(self, name: str) -> str:
        """The file tensor NAME is stored in."""
        return self._stored[name].file

    def inputs_for(self, name: str) -> list[TensorInfo]:
        """Tensor NAME itself."""
        return [self._stored[name]]

    def transforms(self, name: str) -> bool:
        """Never: tensor NAME is read as stored."""
        return False

    def work_bytes(self, name: str) -> int:
        """None beyond what the pipeline counts for tensor NAME itself."""
        return 0

    def dense(self, name: str, raw: dict, device: torch.device) -> torch.Tensor:
        """Tensor NAME's stored bytes in RAW viewed as its dtype and shape, on DEVICE."""
        return _typed(raw, self._stored[name]).to(device, non_blocking=True)

    def describe(self) -> str | None:
        """None: nothing is expanded."""
        return None


class _Entry:
    """One dequantized weight: the stored tensors it is made of and its dense shape."""

    __slots__ = ("name", "module", "main", "parts", "shape", "scheme", "exact")

    def __init__(self, name, module, main, parts, shape, scheme=None, exact=True):
        self.name = name  # dense name, "<module>.weight"
        self.module = module
        self.main = main  # the stored tensor that places it (file, order)
        self.parts: dict[str, TensorInfo] = parts  # suffix -> stored tensor read to rebuild it
        self.shape: tuple[int, int] = shape
        self.scheme = scheme  # compressed-tensors scheme (CT sources)
        self.exact = exact  # False: in_features inferred from packing, checked at run time


class ExpandingDequantizer:
    """What the dequantizers of quantized sources share: each quantized weight is rebuilt dense
    from its stored tensors (see the module docstring); subclasses find them (`_find`) and say
    how to rebuild one (`_dense`). Implements :class:`Dequantizer`."""

    kind = "quantized"
    stacking = False  # keeps untargeted quantized modules as stored (compressed-tensors only)

    def __init__(self, dtype_name: str):
        """dtype_name: the dense dtype to expand to, a key of streamer.formats.DEQUANT_DTYPES."""
        self.dtype_name = dtype_name
        self.st_dtype = DEQUANT_DTYPES[dtype_name]
        self.dtype = torch_dtype(self.st_dtype)
        self.entries: dict[str, _Entry] = {}
        self.consumed: set[str] = set()
        self._orig: dict[str, TensorInfo] = {}
        self.kept: dict[str, str] = {}  # module kept as stored -> the source's config group
        self.ignore: list[str] = []

    def keeps(self, module: str) -> bool:
        """Whether MODULE is kept quantized as the source stores it (stacking)."""
        return module in self.kept

    def kept_groups(self) -> dict[str, object]:
        """The source's config groups that still describe stored modules, in source order."""
        return {}

    def keep_stored(self, quantized: set[str]) -> bool:
        """Whether expanded weights the plan does not quantize (QUANTIZED: those it does) are
        kept as stored instead: only a stacking dequantizer does (see Dequantizer)."""
        return False

    # -- plan time -----------------------------------------------------------------------------

    def plan_inputs(self, by_name: dict[str, TensorInfo]) -> tuple[dict[str, TensorInfo], set[str]]:
        """(name -> info with each quantized weight as its dense self, names consumed).

        by_name: every stored tensor by name. Raises PlanError naming each quantized weight
        whose stored tensors do not fit together."""
        self._orig = dict(by_name)
        problems: list[str] = []
        self.entries, self.consumed = self._find(by_name, problems)
        if problems:
            raise PlanError(problems)
        # each dense weight takes the place of its main stored tensor (weight / weight_packed)
        at_main = {e.main.name: e for e in self.entries.values()}
        out: dict[str, TensorInfo] = {}
        for name, info in by_name.items():
            e = at_main.get(name)
            if e is not None:
                out[e.name] = TensorInfo(e.name, e.main.file, self.st_dtype, e.shape, e.main.span)
            elif name not in self.consumed and name not in self.entries:
                out[name] = info
        return out, self.consumed - set(self.entries)

    def _find(self, by_name, problems) -> tuple[dict[str, _Entry], set[str]]:
        raise NotImplementedError

    def dense_dtype(self, name: str) -> str:
        """The dtype tensor NAME has once read: the expanded dtype for a quantized weight."""
        return self.st_dtype if name in self.entries else self._orig[name].dtype

    def shard_of(self, name: str) -> str:
        """The file that places tensor NAME (a quantized weight: its main stored tensor's)."""
        e = self.entries.get(name)
        return e.main.file if e is not None else self._orig[name].file

    def inputs_for(self, name: str) -> list[TensorInfo]:
        """The stored tensors read to produce tensor NAME (data and scales of a quantized one)."""
        e = self.entries.get(name)
        return list(e.parts.values()) if e is not None else [self._orig[name]]

    def transforms(self, name: str) -> bool:
        """Whether tensor NAME is a quantized weight rebuilt dense."""
        return name in self.entries

    def work_bytes(self, name: str) -> int:
        """Working memory NAME needs beyond its stored bytes, for the pipeline's byte budget:
        the dense weight and the float temporaries of expanding and quantizing it (as the
        pipeline's WORK_FACTOR does for a dense source); 0 for tensors read as they are."""
        e = self.entries.get(name)
        if e is None:
            return 0
        return DENSE_WORK_FACTOR * math.prod(e.shape) * self.dtype.itemsize

    # -- run time ------------------------------------------------------------------------------

    def dense(self, name: str, raw: dict, device: torch.device) -> torch.Tensor:
        """The dense tensor NAME on DEVICE, from RAW: a piece's fetched bytes, a uint8 tensor per
        stored tensor keyed by TensorInfo.key."""
        e = self.entries.get(name)
        if e is None:
            return _typed(raw, self._orig[name]).to(device, non_blocking=True)
        parts = {suffix: _typed(raw, info).to(device, non_blocking=True) for suffix, info in e.parts.items()}
        w = self._dense(e, parts)
        if tuple(w.shape) != e.shape:
            raise StreamerError(
                f"{name}: dequantized to shape {list(w.shape)} but the plan expected {list(e.shape)}"
                + ("" if e.exact else " (inferred from the packed width: weight_shape disagrees)")
            )
        return w

    def _dense(self, e: _Entry, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        """How the source is expanded, for the plan and the model card."""
        raise NotImplementedError

    def same_scheme_as(self, recipe) -> str | None:
        """A label of the source's scheme when RECIPE would write the same one, else None."""
        raise NotImplementedError


def _typed(raw: dict, info: TensorInfo) -> torch.Tensor:
    buf = raw[info.key]
    dt = torch_dtype(info.dtype)
    try:
        t = buf.view(dt)
    except RuntimeError:  # a view inside a merged read that is not aligned for this dtype
        t = buf.clone().view(dt)
    return t.reshape(info.shape)


# ----------------------------------------------------------------------------------------------
# FP8 with block scales (DeepSeek-V3 layout)
# ----------------------------------------------------------------------------------------------


class FP8BlockDequantizer(ExpandingDequantizer):
    """FP8 weights with block scales (`weight_scale_inv`, DeepSeek-V3 layout), expanded to dense."""

    kind = "fp8-block"

    def __init__(self, qc: dict, dtype_name: str):
        """qc: the source's quantization_config (weight_block_size, fmt, activation_scheme);
        dtype_name: the dense dtype to expand to (a key of streamer.formats.DEQUANT_DTYPES).
        """
        super().__init__(dtype_name)
        block = qc.get("weight_block_size")
        if (
            not isinstance(block, (list, tuple))
            or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)
        ):
            raise SchemeError(
                f"config.json: quantization_config.weight_block_size must be [rows, cols], got {block!r}"
            )
        self.block = (int(block[0]), int(block[1]))
        self.fmt = str(qc.get("fmt") or "e4m3")
        self.activation_scheme = str(qc.get("activation_scheme") or "dynamic")

    def _find(self, by_name, problems):
        entries: dict[str, _Entry] = {}
        consumed: set[str] = set()
        bh, bw = self.block
        for name, info in by_name.items():
            module, _, leaf = name.rpartition(".")
            if leaf == "weight_scale_inv":
                w = by_name.get(f"{module}.weight")
                if w is None:
                    problems.append(f"{name}: block scale without its weight {module}.weight")
                elif w.dtype not in _FP8_STORED:
                    problems.append(f"{name}: the weight it scales, {w.name}, is {w.dtype}, not FP8")
                elif len(w.shape) != 2:
                    problems.append(f"{w.name}: FP8 weight of shape {list(w.shape)} is not 2-D")
                else:
                    rows, cols = w.shape
                    want = (-(-rows // bh), -(-cols // bw))
                    if tuple(info.shape) != want:
                        problems.append(
                            f"{name}: shape {list(info.shape)}, but weight {list(w.shape)} in "
                            f"{bh}x{bw} blocks needs {list(want)} (weight_block_size in config.json?)"
                        )
                    elif info.dtype not in FLOAT_DTYPES:
                        problems.append(f"{name}: dtype {info.dtype} is not a float scale")
                    else:
                        parts = {"weight": w, "weight_scale_inv": info}
                        entries[w.name] = _Entry(w.name, module, w, parts, (rows, cols))
                consumed.add(name)
        for name, info in by_name.items():
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and info.dtype in _FP8_STORED and name not in entries:
                if f"{module}.weight_scale_inv" not in by_name:
                    problems.append(f"{name}: {info.dtype} weight without {module}.weight_scale_inv")
            elif leaf == "input_scale" and f"{module}.weight" in entries:
                consumed.add(name)  # static activation scales of the source: not needed
        return entries, consumed

    def _dense(self, e, parts):
        # FP8BlockDequantizer: (weight.to(float32) * scale_inv.to(float32)).to(dtype), each
        # block's scale over its (possibly partial, at the edges) block. Elementwise, so row
        # chunks give the same bits as the whole tensor.
        w, s = parts["weight"], parts["weight_scale_inv"]
        rows, cols = e.shape
        bh, bw = self.block
        out = torch.empty((rows, cols), dtype=self.dtype, device=w.device)
        sc = s.to(torch.float32).repeat_interleave(bw, dim=1)[:, :cols]  # (nbr, cols)
        step = rows if w.device.type != "cpu" else max(1, _CPU_CHUNK // max(cols, 1))
        step = max(bh, step // bh * bh)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            s_rows = sc[r0 // bh : -(-r1 // bh)].repeat_interleave(bh, dim=0)[: r1 - r0]
            out[r0:r1] = (w[r0:r1].to(torch.float32) * s_rows).to(self.dtype)
        return out

    def describe(self) -> str:
        """How the source is expanded, for the plan and the model card."""
        bh, bw = self.block
        return (
            f"fp8 ({self.fmt}) block {bh}x{bw} (DeepSeek-style weight_scale_inv), "
            f"{len(self.entries)} weights -> {self.dtype_name}"
        )

    def source_scheme(self):
        """The source's quantization as a compressed-tensors QuantizationScheme."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        weights = QuantizationArgs(
            num_bits=8, type="float", symmetric=True, strategy="block", block_structure=list(self.block)
        )
        acts = None
        if self.activation_scheme == "dynamic":
            acts = QuantizationArgs(
                num_bits=8, type="float", symmetric=True, strategy="group", group_size=128, dynamic=True
            )
        return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)

    def same_scheme_as(self, recipe) -> str | None:
        """"fp8 block …" when RECIPE writes what the source stores, else None."""
        src = self.source_scheme()
        groups = list(recipe.groups.values())
        if groups and all(_same_scheme(src, g) for g in groups):
            bh, bw = self.block
            return f"fp8 block {bh}x{bw} weights"
        return None


# ----------------------------------------------------------------------------------------------
# compressed-tensors
# ----------------------------------------------------------------------------------------------


class CompressedTensorsDequantizer(ExpandingDequantizer):
    """A compressed-tensors checkpoint, expanded by the library's own decompressors; stacking:
    the modules the recipe does not target are kept as stored."""

    kind = "compressed-tensors"

    def __init__(self, qc: dict, dtype_name: str, *, recipe=None, force: bool = False):
        """qc: the source's quantization_config; dtype_name: the dense dtype to expand to (a key of
        streamer.formats.DEQUANT_DTYPES); recipe: stack on the source (keep what it does not
        target as stored); None expands every quantized weight. force: re-quantize targeted
        modules to the scheme they have."""
        super().__init__(dtype_name)
        self.recipe = recipe
        self.stacking = recipe is not None
        self.force = force
        self.also_keep: set[str] = set()  # targeted, but the plan leaves them unquantized
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.compressors.format import infer_module_format
        from compressed_tensors.config import CompressionFormat
        from compressed_tensors.quantization import QuantizationConfig

        transform = qc.get("transform_config")
        if transform:
            raise SchemeError(
                "the source's quantization_config has a transform_config (rotations such as "
                "SpinQuant/QuIP): streamer cannot undo those transforms; convert a dense checkpoint"
            )
        sparsity = qc.get("sparsity_config")
        if isinstance(sparsity, dict) and sparsity.get("format") not in (None, "dense"):
            raise SchemeError(
                f"the source is sparse-compressed ({sparsity.get('format')!r}): streamer cannot "
                "decompress sparse formats; convert a dense checkpoint"
            )
        data = {k: v for k, v in qc.items() if k not in ("version", "transform_config", "sparsity_config")}
        try:
            self.config = QuantizationConfig.model_validate(data)
        except Exception as e:  # pydantic's message names the bad field
            raise SchemeError(
                f"config.json: quantization_config is not a valid compressed-tensors config: {e}"
            ) from None
        self.ignore = list(self.config.ignore or [])
        self.groups: dict[str, object] = {}
        self.params: dict[str, tuple[str, ...]] = {}  # group -> stored weight params, primary first
        top = self.config.format if self.config.format not in (None, "mixed-precision") else None
        for gname, scheme in self.config.config_groups.items():
            if scheme.weights is None:
                continue  # activation-only groups (attention, kv cache) hold no weights
            scheme = scheme.model_copy(deep=True)
            fmt = scheme.format or top or infer_module_format(torch.nn.Linear, scheme)
            if fmt == CompressionFormat.dense.value:
                continue  # weights stored dense (only activations / kv cache were quantized)
            try:
                fmt = CompressionFormat(fmt).value
                compressor = BaseCompressor.get_value_from_registry(fmt)
                names = compressor.compression_param_names(scheme)
            except Exception:
                raise SchemeError(
                    f"config group {gname!r} of the source uses format {fmt!r}, which streamer "
                    "cannot decompress"
                ) from None
            scheme.format = fmt
            self.groups[gname] = scheme
            self.params[gname] = tuple(p for p in names if p.startswith("weight"))

    def _group_for(self, module: str, present: set[str]) -> str | None:
        from compressed_tensors.utils.match import match_name

        if module.endswith("norm") or any(match_name(module, ign) for ign in self.ignore):
            return None
        if not self.groups:
            return None
        named = [g for g, s in self.groups.items() if any(match_name(module, t) for t in s.targets)]
        # class targets ("Linear", …) cannot be checked from tensor names: any module whose
        # stored parameters fit the group's format is taken to be one
        classes = [g for g, s in self.groups.items() if not s.targets or any(
            not t.startswith("re:") for t in s.targets)]
        for g in named + classes:
            if self.params[g][0] in present:
                return g
        return None

    def _find(self, by_name, problems):
        from compressed_tensors.quantization import QuantizationMetadata

        qparams = set(QuantizationMetadata.all_qparam_names()) | {"weight_packed"}
        present: dict[str, set[str]] = {}
        for name in by_name:
            module, _, leaf = name.rpartition(".")
            present.setdefault(module, set()).add(leaf)
        entries: dict[str, _Entry] = {}
        consumed: set[str] = set()
        self.kept = {}
        same: list[tuple[str, str]] = []  # (module, group): targeted, already in the recipe's scheme
        for module, leaves in present.items():
            g = self._group_for(module, leaves)
            if g is None:
                continue
            names = self.params[g]
            scheme = self.groups[g]
            if names[0] == "weight" and "weight_scale" not in leaves:
                continue  # a targeted module the source left dense (no scale): passes through
            if names[0] == "weight" and by_name[f"{module}.weight"].dtype in _FLOAT_STORED:
                problems.append(
                    f"{module}.weight: stored as {by_name[module + '.weight'].dtype} next to its "
                    f"weight_scale: the checkpoint is not compressed ({scheme.format}), so "
                    "streamer cannot tell what the scale applies to"
                )
                continue
            if names[0] != "weight" and "weight" in leaves:
                problems.append(f"{module}: both {module}.weight and {module}.{names[0]} are stored")
                continue
            if "weight_g_idx" in leaves:
                problems.append(
                    f"{module}.weight_g_idx: activation-ordered (g_idx) weights are not supported"
                )
                continue
            missing = [p for p in names if p not in leaves and p != "weight_zero_point"]
            if not scheme.weights.symmetric and "weight_zero_point" not in leaves:
                missing.append("weight_zero_point")
            if missing:
                problems.append(f"{module}: quantized with group {g!r} ({scheme.format}) but "
                                f"{', '.join(module + '.' + p for p in missing)} not in the checkpoint")
                continue
            if self.stacking:
                target = None if module in self.also_keep else self.recipe.match(module)
                if target is None:
                    self.kept[module] = g  # its stored tensors pass through as they are
                    continue
                if not self.force and _same_scheme(scheme, target[1]):
                    same.append((module, g))
            parts = {p: by_name[f"{module}.{p}"] for p in names if p in leaves}
            try:
                shape, exact = _dense_shape(parts, scheme)
            except ValueError as e:
                problems.append(f"{module}: {e}")
                continue
            dense = f"{module}.weight"
            entries[dense] = _Entry(dense, module, parts[names[0]], parts, shape, scheme, exact)
            consumed.update(f"{module}.{p}" for p in leaves if p in qparams or p in names)
        if same:
            raise self._same_scheme_refusal(same)
        for name in by_name:
            module, _, leaf = name.rpartition(".")
            if name in consumed or f"{module}.weight" in entries or module in self.kept:
                continue
            if leaf in _KV_PARAMS or (
                leaf in ("output_scale", "output_zero_point") and self.config.kv_cache_scheme is not None
            ):
                consumed.add(name)  # kv cache scales: the new recipe has no kv cache scheme
            elif leaf in qparams:
                problems.append(
                    f"{name}: a quantization parameter of {module}, which no config group of the "
                    "source's quantization_config targets (or which it ignores)"
                )
        return entries, consumed

    def _same_scheme_refusal(self, same: list[tuple[str, str]]) -> SchemeError:
        label = _args_label(self.groups[same[0][1]].weights)
        names = collapse_names([m for m, _ in same])
        shown = ", ".join(names[:4]) + (", …" if len(names) > 4 else "")
        # leaving them out of the scheme's targets keeps them as stored
        return SchemeError(
            f"{len(same)} module(s) the scheme targets are already quantized with {label}, which "
            f"is what {self.recipe.name} writes: {shown}. Re-quantizing them gains nothing",
            hints=(Hint("ignore"), Hint("force")),
        )

    def kept_groups(self) -> dict[str, object]:
        """The source's config groups that still describe stored modules, in source order."""
        used = set(self.kept.values())
        return {g: s for g, s in self.groups.items() if g in used}

    def keep_stored(self, quantized: set[str]) -> bool:
        """Stacking: the targeted weights the plan leaves unquantized (not in QUANTIZED: default
        policy, shape) would be written dense from the dequantized values; keep them as the
        source stores them instead. True when there were any."""
        if not self.stacking:
            return False
        lost = {e.module for n, e in self.entries.items() if n not in quantized}
        self.also_keep |= lost
        return bool(lost)

    def _dense(self, e, parts):
        from streamer.quant.kernels import dequantize_weight

        return dequantize_weight(parts, e.scheme, self.dtype)

    def describe(self) -> str:
        """How the source is expanded, for the plan and the model card."""
        used = {}
        for e in self.entries.values():
            used[id(e.scheme)] = e.scheme
        schemes = list(used.values()) or list(self.groups.values())
        if not used and self.kept:  # stacking only: nothing is expanded
            return f"compressed-tensors, {len(self.kept)} modules kept as stored, none expanded"
        label = "; ".join(f"{s.format} {_args_label(s.weights)}" for s in schemes) or "(weights stored dense)"
        kept = f"; {len(self.kept)} modules kept as stored" if self.kept else ""
        return f"compressed-tensors {label}, {len(self.entries)} weights -> {self.dtype_name}{kept}"

    def same_scheme_as(self, recipe) -> str | None:
        """A label of the source's groups when RECIPE's groups quantize alike, else None."""
        src = list(self.groups.values())
        dst = list(recipe.groups.values())
        if dst and len(src) == len(dst) and all(_same_scheme(a, b) for a, b in zip(src, dst)):
            return "compressed-tensors " + "; ".join(_args_label(s.weights) for s in src)
        return None


def _dense_shape(parts: dict[str, TensorInfo], scheme) -> tuple[tuple[int, int], bool]:
    """(dense shape, exact) of a compressed-tensors weight, from stored shapes only."""
    args = scheme.weights
    fmt = scheme.format
    if "weight" in parts:
        w = parts["weight"]
        if len(w.shape) != 2:
            raise ValueError(f"quantized weight of shape {list(w.shape)} is not 2-D")
        return tuple(w.shape), True
    p = parts["weight_packed"]
    if len(p.shape) != 2:
        raise ValueError(f"packed weight of shape {list(p.shape)} is not 2-D")
    rows, pcols = p.shape
    if fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        return (rows, pcols * 2), True
    if fmt == "mxfp6-pack-quantized":
        return (rows, pcols * 4 // 3), True
    if fmt != "pack-quantized":
        raise ValueError(f"format {fmt!r} with a weight_packed tensor is not understood")
    bits = int(args.num_bits)
    hi = pcols * 32 // bits
    cands = list(range(max(1, (pcols - 1) * 32 // bits + 1), hi + 1))
    scale = parts.get("weight_scale")
    gs = args.group_size
    if gs and scale is not None and len(scale.shape) == 2 and str(args.strategy) in ("group", "tensor_group"):
        fit = [c for c in cands if c % gs == 0 and c // gs == scale.shape[1]]
        if not fit:
            fit = [c for c in cands if math.ceil(c / gs) == scale.shape[1]]
        if not fit:
            raise ValueError(
                f"weight_packed {list(p.shape)} and weight_scale {list(scale.shape)} do not fit "
                f"{bits}-bit groups of {gs}"
            )
        cands = fit
    if len(cands) == 1:
        return (rows, cands[0]), True
    return (rows, max(cands)), False


def _args_label(args) -> str:
    if args is None:
        return "unquantized"
    kind = f"{args.type}{args.num_bits}"
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy in ("group", "tensor_group"):
        kind += f" {strategy} {args.group_size}"
    elif strategy == "block":
        kind += f" block {'x'.join(map(str, args.block_structure or []))}"
    else:
        kind += f" per {strategy}"
    return kind + ("" if args.symmetric else " asymmetric")


def _args_key(args):
    if args is None:
        return None
    strategy = str(getattr(args.strategy, "value", args.strategy))
    return (
        int(args.num_bits), str(getattr(args.type, "value", args.type)), bool(args.symmetric), strategy,
        args.group_size if strategy in ("group", "tensor_group") else None,
        tuple(args.block_structure) if strategy == "block" and args.block_structure else None,
        bool(args.dynamic) if args.dynamic is not None else None,
    )


def _same_scheme(a, b) -> bool:
    """Whether two schemes quantize weights (and input activations) the same way."""
    if _args_key(a.weights) != _args_key(b.weights):
        return False
    ia, ib = a.input_activations, b.input_activations
    if (ia is None) != (ib is None):
        return False
    if ia is not None:
        ka, kb = _args_key(ia), _args_key(ib)
        # activation grouping of dynamic schemes is a kernel choice; compare kind and bits
        return ka[:3] == kb[:3] and ka[-1] == kb[-1]
    return True


__all__ = [
    "Dequantizer",
    "PassThrough",
    "ExpandingDequantizer",
    "FP8BlockDequantizer",
    "CompressedTensorsDequantizer",
    "detect_dequantizer",
    "source_dtype_name",
]
