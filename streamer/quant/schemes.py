"""The recipe: which scheme applies to which module, built from compressed-tensors' own presets.

A recipe is a compressed-tensors QuantizationConfig (config groups + ignore list) that has been
checked to be data-free: every group quantizes weights, and no activation needs a static
(calibrated) scale.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from compressed_tensors import __version__ as ct_version
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
)
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES, preset_name_to_scheme
from compressed_tensors.utils.match import match_name

from streamer.errors import Hint, SchemeError
from streamer.quant.spec import compression_format


def _needs_calibration(scheme: QuantizationScheme) -> str | None:
    """Why a scheme cannot be applied without data, or None if it can."""
    if scheme.weights is None:
        return "it quantizes no weights"
    for kind in ("input_activations", "output_activations"):
        args = getattr(scheme, kind)
        if args is not None and args.dynamic is not True:
            return f"its {kind.replace('_', ' ')} need static scales from calibration data"
    return None


def accepted_presets() -> list[str]:
    """compressed-tensors' preset schemes that need no calibration data, in its order."""
    return [
        name
        for name in PRESET_SCHEMES
        if _needs_calibration(preset_name_to_scheme(name, ["Linear"])) is None
    ]


def _refuse(what: str, why: str) -> SchemeError:
    # the preset that quantizes the weights alike without data (NVFP4 -> NVFP4A16, FP8 -> FP8_DYNAMIC)
    alike = [p for p in (f"{what}A16", f"{what}_DYNAMIC") if p in accepted_presets()]
    return SchemeError(
        f"{what} cannot be applied without calibration data: {why}. "
        f"Accepted schemes: {', '.join(accepted_presets())}",
        hints=(*(Hint("scheme", a) for a in alike[:1]), Hint("scheme_file")),
    )


@dataclass(frozen=True)
class Recipe:
    """Which scheme applies to which module: a checked, data-free QuantizationConfig."""

    name: str  # preset name or scheme-file stem; shown in logs, plan and model card
    config: QuantizationConfig  # config_groups (with format set) + ignore, status INITIALIZED

    @property
    def ignore(self) -> list[str]:
        """The recipe's ignore entries."""
        return list(self.config.ignore or [])

    @property
    def groups(self) -> dict[str, QuantizationScheme]:
        """Config group name -> scheme."""
        return dict(self.config.config_groups)

    def match(self, module: str) -> tuple[str, QuantizationScheme] | None:
        """The first config group that targets MODULE, unless MODULE is ignored.

        Matching is compressed-tensors' own `match_name` on module names: a plain string must
        equal the name, `re:PATTERN` is `re.match` (anchored at the start only). The target
        "Linear" matches every module, since headers carry no class names.
        """
        if any(match_name(module, ign) for ign in self.ignore):
            return None
        for group_name, scheme in self.config.config_groups.items():
            targets = scheme.targets
            if not targets or "Linear" in targets or any(match_name(module, t) for t in targets):
                return group_name, scheme
        return None

    def output_groups(self, kept_groups: dict[str, QuantizationScheme] | None = None) -> dict[str, QuantizationScheme]:
        """The config groups the output declares: KEPT_GROUPS (a stacked source's groups that
        still describe stored modules) first, then the recipe's, renamed on a clash as
        compressed-tensors' `QuantizationConfig.merge` does (config_group_0 -> config_group_1),
        which is what llm-compressor writes when model_free_ptq runs on its own output."""
        from compressed_tensors.utils.helpers import find_unique_name

        groups = dict(kept_groups or {})
        for name, scheme in self.config.config_groups.items():
            groups[find_unique_name(name, groups.keys())] = scheme
        return groups

    def quantization_config(
        self, ignore: list[str] | None = None, kept_groups: dict[str, QuantizationScheme] | None = None
    ) -> dict:
        """config.json's `quantization_config`, serialized by compressed-tensors itself.

        ignore: the list loaders read (the plan's: the user's entries plus what the default
        policy kept); the recipe's own ignore list when None.
        kept_groups: a stacked source's groups kept as stored (see output_groups)."""
        groups = self.output_groups(kept_groups)
        formats = {s.format for s in groups.values() if s.format is not None}
        fmt = next(iter(formats)) if len(formats) == 1 else "mixed-precision"
        final = QuantizationConfig(
            config_groups=groups,
            kv_cache_scheme=self.config.kv_cache_scheme,
            ignore=self.ignore if ignore is None else list(ignore),
            quantization_status=QuantizationStatus.COMPRESSED,
            format=fmt,
        )
        return {
            "version": ct_version,
            "quant_method": "compressed-tensors",
            "transform_config": {},
            **final.model_dump(),
        }


def make_recipe(
    scheme: str | QuantizationScheme | None = None,
    *,
    scheme_file: str | Path | None = None,
    config: QuantizationConfig | None = None,
    ignore: list[str] | tuple[str, ...] = (),
) -> Recipe:
    """The Recipe of exactly one of SCHEME (a preset name or a QuantizationScheme),
    SCHEME_FILE (JSON/YAML: a config, a scheme or {group: scheme}) or CONFIG (a
    QuantizationConfig), with the IGNORE entries added to its ignore list.

    Raises SchemeError for an unknown scheme, a scheme that needs calibration data, a bad file
    (naming the field) or an invalid `re:` entry.
    """
    if sum(x is not None for x in (scheme, scheme_file, config)) != 1:
        raise SchemeError(
            "give exactly one of a scheme, a scheme file or a quantization config",
            hints=(Hint("scheme"), Hint("scheme_file")),
        )
    ignore = [str(i) for i in ignore]
    _check_ignore(ignore)

    if config is not None:
        name = next(iter(config.config_groups), "config")
        config = config.model_copy(
            deep=True,
            update={"ignore": list(config.ignore or []) + ignore, "quantization_status": QuantizationStatus.INITIALIZED},
        )
    elif scheme_file is not None:
        name, config = _load_scheme_file(Path(scheme_file))
        config = config.model_copy(update={"ignore": list(config.ignore or []) + ignore})
    elif isinstance(scheme, QuantizationScheme):
        name = "config_group_0"
        config = QuantizationConfig(
            config_groups={name: scheme.model_copy(deep=True)},
            quantization_status=QuantizationStatus.INITIALIZED,
            ignore=ignore,
        )
    else:
        name = str(scheme).upper()
        if name not in PRESET_SCHEMES:
            accepted = accepted_presets()
            close = difflib.get_close_matches(name, accepted, n=1, cutoff=0.75)  # a typo: FP8_DYNAMC
            raise SchemeError(
                # the likely meaning first: the list after it is long
                f"unknown scheme {scheme!r}{f' (did you mean {close[0]}?)' if close else ''}. "
                f"Accepted schemes: {', '.join(accepted)}",
                # the preset meant, when it is plain; a scheme that is not a preset goes in a file
                hints=(*(Hint("scheme", close[0]) for _ in close), Hint("scheme_file")),
            )
        config = QuantizationConfig(
            config_groups={name: preset_name_to_scheme(name, [])},
            quantization_status=QuantizationStatus.INITIALIZED,
            ignore=ignore,
        )

    for group_name, group in config.config_groups.items():
        why = _needs_calibration(group)
        if why:
            label = name if len(config.config_groups) == 1 else f"{name} (group {group_name})"
            raise _refuse(label, why)
        if not group.targets:
            group.targets.append("Linear")
        if group.format is None:
            group.format = compression_format(group)
    return Recipe(name=name, config=config)


def _check_ignore(ignore: list[str]) -> None:
    import re

    for item in ignore:
        if item.startswith("re:"):
            try:
                re.compile(item[3:])
            except re.error as e:
                raise SchemeError(f"ignore pattern {item!r} is not a valid regex: {e}") from None


# Keys of a whole config.json `quantization_config` that streamer writes itself or that carry
# no setting (QuantizationConfig ignores unknown keys, so a typo such as `ignroe:` would
# otherwise be dropped without a word and lm_head quantized).
_CONFIG_EXTRA_KEYS = {"version", "quant_method", "transform_config", "sparsity_config"}
_ARGS_FIELDS = ("weights", "input_activations", "output_activations")


class _FileError(Exception):
    """A scheme-file problem at LOC (a dotted path of keys in the file)."""

    def __init__(self, loc: str, message: str):
        super().__init__(message)
        self.loc = loc
        self.message = message


def _load_scheme_file(path: Path) -> tuple[str, QuantizationConfig]:
    """JSON or YAML holding a QuantizationConfig, a QuantizationScheme, or {group: scheme}.

    Validated completely here, before any source is opened: every key and type, then every
    group built the way the conversion will build it (compression format, kernel spec, a trial
    quantization of a small weight, the serialized quantization_config). Any problem is a
    SchemeError naming the file and the field, never a ValueError halfway through a run.
    """
    try:
        text = path.read_text()
    except OSError as e:
        raise SchemeError(f"cannot read scheme file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SchemeError(f"scheme file {path} is not UTF-8 text") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SchemeError(f"scheme file {path} is not valid JSON/YAML: {e}") from None
    except RecursionError:
        raise SchemeError(f"scheme file {path} is not valid JSON/YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise SchemeError(
            f"scheme file {path} must hold a mapping (config_groups, a scheme with targets and "
            f"weights, or {{group: scheme}}), found {_yaml_type(data)}"
        )
    try:
        config = _parse_scheme_data(data)
        _check_buildable(config)
    except _FileError as e:
        where = f": {e.loc}" if e.loc else ""
        raise SchemeError(f"scheme file {path}{where}: {e.message}") from None
    return path.stem, config


def _yaml_type(v) -> str:
    if v is None:
        return "nothing (empty)"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(v), type(v).__name__)  # fmt: skip


def _parse_scheme_data(data: dict) -> QuantizationConfig:
    from pydantic import ValidationError

    prefix = ""
    if "quantization_config" in data:  # a whole config.json works too
        data = data["quantization_config"]
        prefix = "quantization_config."
        if not isinstance(data, dict):
            raise _FileError("quantization_config", f"must be a mapping, found {_yaml_type(data)}")
    try:
        if "config_groups" in data:
            allowed = set(QuantizationConfig.model_fields) | _CONFIG_EXTRA_KEYS
            unknown = sorted(str(k) for k in data if k not in allowed)
            if unknown:
                raise _FileError(
                    prefix + unknown[0],
                    f"unknown key; a quantization config has {', '.join(sorted(allowed))}",
                )
            for key in ("sparsity_config", "transform_config"):
                if data.get(key):
                    raise _FileError(prefix + key, "streamer applies no sparsity or transforms; remove it")
            if data.get("kv_cache_scheme") is not None:
                raise _FileError(
                    prefix + "kv_cache_scheme",
                    "KV-cache quantization needs static scales from calibration data, which a "
                    "data-free conversion cannot produce; remove it",
                )
            groups = data["config_groups"]
            if not isinstance(groups, dict) or not groups:
                raise _FileError(prefix + "config_groups", "must be a non-empty mapping of group name to scheme")
            for gname, group in groups.items():  # one by one, so errors name the group
                _validate_scheme(group, f"{prefix}config_groups.{gname}")
            body = {k: v for k, v in data.items() if k not in _CONFIG_EXTRA_KEYS}
            body["quantization_status"] = "initialized"
            config = QuantizationConfig.model_validate(body)
            config.quantization_status = QuantizationStatus.INITIALIZED
            return config
        if "weights" in data or "targets" in data:
            scheme = _validate_scheme(data, "")
            return QuantizationConfig(config_groups={"group_0": scheme}, quantization_status=QuantizationStatus.INITIALIZED)
        if not data:
            raise _FileError("", "holds no scheme")
        groups = {gname: _validate_scheme(group, str(gname)) for gname, group in data.items()}
        return QuantizationConfig(config_groups=groups, quantization_status=QuantizationStatus.INITIALIZED)
    except ValidationError as e:
        raise _pydantic_error(e, prefix) from None
    except (ValueError, TypeError, NotImplementedError) as e:  # raised by a model validator
        raise _FileError(prefix.rstrip("."), _one_line(str(e))) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _validate_scheme(group, where: str) -> QuantizationScheme:
    """One scheme (targets, weights, activations) at WHERE in the file, checked key by key."""
    from pydantic import ValidationError

    if not isinstance(group, dict):
        raise _FileError(
            where,
            f"must be a scheme (a mapping with targets and weights), found {_yaml_type(group)}; "
            "a file holds config_groups, one scheme, or {group: scheme}",
        )
    dot = f"{where}." if where else ""
    for kind in _ARGS_FIELDS:
        args = group.get(kind)
        if not isinstance(args, dict):
            continue  # pydantic names the wrong type below
        for key in ("num_bits", "group_size"):
            # pydantic would take `true` for 1: a boolean is never a bit width or a group size
            if isinstance(args.get(key), bool):
                raise _FileError(f"{dot}{kind}.{key}", f"must be a whole number, found {args[key]!r}")
        try:  # alone first, so that a validator's refusal is placed at this section
            QuantizationArgs.model_validate(args)
        except ValidationError as e:
            raise _pydantic_error(e, f"{dot}{kind}.", QuantizationArgs) from None
        except (ValueError, TypeError, NotImplementedError) as e:
            raise _FileError(f"{dot}{kind}", _one_line(str(e))) from None
    try:
        scheme = QuantizationScheme.model_validate({"targets": [], **group})
    except ValidationError as e:
        raise _pydantic_error(e, dot) from None
    except (ValueError, TypeError, NotImplementedError) as e:  # a validator's own refusal
        raise _FileError(where, _one_line(str(e))) from None
    why = _needs_calibration(scheme)
    if why is not None:
        field = "weights" if scheme.weights is None else next(
            k for k in ("input_activations", "output_activations")
            if getattr(scheme, k) is not None and getattr(scheme, k).dynamic is not True
        )  # fmt: skip
        raise _FileError(
            f"{dot}{field}",
            f"cannot be applied without calibration data: {why}"
            + ("; set `dynamic: true`" if field != "weights" else "; add a `weights` section")
            + f". Presets that work: {', '.join(accepted_presets())}",
        )
    return scheme


def _pydantic_error(e, prefix: str, model=None) -> _FileError:
    """The first real problem of a pydantic ValidationError, as (dotted key path, sentence)."""
    errors = e.errors()
    # A group is `QuantizationScheme | list[str]` in QuantizationConfig: the list branch's
    # complaint is noise whenever the scheme branch has a real one.
    real = [x for x in errors if "list[str]" not in [str(p) for p in x["loc"]]] or errors
    err = real[0]
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and "[" in p)]
    path = (prefix + ".".join(loc)).rstrip(".")
    msg = _one_line(err["msg"].removeprefix("Value error, "))
    if err["type"] == "extra_forbidden":
        parent = loc[-2] if len(loc) >= 2 else ""
        if model is not None and len(loc) == 1:
            fields = model.model_fields
        elif parent in _ARGS_FIELDS or parent == "kv_cache_scheme":
            fields = QuantizationArgs.model_fields
        else:
            fields = QuantizationScheme.model_fields
        msg = f"unknown key; allowed here: {', '.join(fields)}"
    elif "input" in err and err["type"] != "missing" and not isinstance(err["input"], dict):
        msg = f"{msg} (found {err['input']!r})"
    more = len(real) - 1
    return _FileError(path, msg + (f" (and {more} more problem(s))" if more > 0 else ""))


def _check_buildable(config: QuantizationConfig) -> None:
    """Build every group the way a conversion will, so that what would fail mid-run fails here."""
    import math
    import re

    import torch

    from streamer.quant.kernels import global_scale, quantize_weight
    from streamer.quant.spec import needs_global_scale, output_layout

    for i, item in enumerate(config.ignore or []):
        if item.startswith("re:"):
            try:
                re.compile(item[3:])
            except re.error as e:
                raise _FileError(f"ignore[{i}]", f"{item!r} is not a valid regex: {e}") from None
    trial_groups = {}
    for gname, group in config.config_groups.items():
        where = f"config_groups.{gname}"
        for i, target in enumerate(group.targets or []):
            if target.startswith("re:"):
                try:
                    re.compile(target[3:])
                except re.error as e:
                    raise _FileError(f"{where}.targets[{i}]", f"{target!r} is not a valid regex: {e}") from None
        group = group.model_copy(deep=True)
        try:
            if group.format is not None:
                group.format = compression_format(group)
        except ValueError as e:
            raise _FileError(f"{where}.format", str(e)) from None
        try:
            args = group.weights
            gs = args.group_size if isinstance(args.group_size, int) and args.group_size > 0 else 1
            bh, bw = (args.block_structure or [1, 1]) if args.strategy == "block" else (1, 1)
            bh, bw = (bh, bw) if isinstance(bh, int) and isinstance(bw, int) and bh > 0 and bw > 0 else (1, 1)
            # a weight shape every valid scheme can take: in divisible by group, block, packing
            shape = (math.lcm(bh, 128), math.lcm(gs, bw, 128))
            output_layout(shape, torch.bfloat16, group)  # the kernel spec and format checks
            if group.format is None:
                group.format = compression_format(group)
            if shape[0] * shape[1] <= 1 << 20:  # run the real kernel once on a small weight
                w = torch.linspace(-1, 1, shape[0] * shape[1], dtype=torch.float32)
                w = w.reshape(shape).to(torch.bfloat16)
                gscale = global_scale([w], group) if needs_global_scale(group) else None
                quantize_weight(w, group, gscale)
        except ValueError as e:  # kernels say what is unsupported and which field it is
            raise _FileError(f"{where}.weights", _one_line(str(e))) from None
        except Exception as e:  # anything else the kernels cannot do with these arguments
            raise _FileError(f"{where}.weights", f"cannot be applied: {type(e).__name__}: {e}") from None
        if not group.targets:
            group.targets.append("Linear")
        trial_groups[gname] = group
    if not trial_groups:
        return
    try:  # what config.json will hold, serialized by compressed-tensors itself
        trial = config.model_copy(update={"config_groups": trial_groups})
        Recipe(name="trial", config=trial).quantization_config()
    except Exception as e:  # any refusal by compressed-tensors, in its words
        raise _FileError("", f"compressed-tensors cannot serialize this quantization config: {_one_line(str(e))}") from None
