"""The recipe: which scheme applies to which module, built from compressed-tensors' own presets.

A recipe is a compressed-tensors QuantizationConfig (config groups + ignore list) that has been
checked to be data-free: every group quantizes weights, and no activation needs a static
(calibrated) scale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from compressed_tensors import __version__ as ct_version
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
)
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES, preset_name_to_scheme
from compressed_tensors.utils.match import match_name

from .errors import SchemeError
from .kernels import compression_format


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
    return [
        name
        for name in PRESET_SCHEMES
        if _needs_calibration(preset_name_to_scheme(name, ["Linear"])) is None
    ]


def _refuse(what: str, why: str) -> SchemeError:
    return SchemeError(
        f"{what} cannot be applied without calibration data: {why}. "
        f"Accepted schemes: {', '.join(accepted_presets())} (or --scheme-file for a custom one)"
    )


@dataclass(frozen=True)
class Recipe:
    name: str  # preset name or scheme-file stem; shown in logs, plan and model card
    config: QuantizationConfig  # config_groups (with format set) + ignore, status INITIALIZED

    @property
    def ignore(self) -> list[str]:
        return list(self.config.ignore or [])

    @property
    def groups(self) -> dict[str, QuantizationScheme]:
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

    def quantization_config(self) -> dict:
        """config.json's `quantization_config`, serialized by compressed-tensors itself."""
        formats = {s.format for s in self.config.config_groups.values() if s.format is not None}
        fmt = next(iter(formats)) if len(formats) == 1 else "mixed-precision"
        final = QuantizationConfig(
            config_groups=self.config.config_groups,
            kv_cache_scheme=self.config.kv_cache_scheme,
            ignore=self.ignore,
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
    if sum(x is not None for x in (scheme, scheme_file, config)) != 1:
        raise SchemeError("give exactly one of --scheme NAME or --scheme-file FILE")
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
            raise SchemeError(
                f"unknown scheme {scheme!r}. Accepted schemes: {', '.join(accepted_presets())}"
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


def _load_scheme_file(path: Path) -> tuple[str, QuantizationConfig]:
    """JSON or YAML holding a QuantizationConfig, a QuantizationScheme, or {group: scheme}."""
    try:
        text = path.read_text()
    except OSError as e:
        raise SchemeError(f"cannot read scheme file {path}: {e.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SchemeError(f"scheme file {path} is not valid JSON/YAML: {e}") from None
    if not isinstance(data, dict):
        raise SchemeError(f"scheme file {path} must hold a mapping")
    data = data.get("quantization_config", data)  # a whole config.json works too
    try:
        if "config_groups" in data:
            data = {k: v for k, v in data.items() if k not in ("version", "quant_method")}
            data.setdefault("quantization_status", "initialized")
            config = QuantizationConfig.model_validate(data)
            config.quantization_status = QuantizationStatus.INITIALIZED
        elif "weights" in data or "targets" in data:
            scheme = QuantizationScheme.model_validate({"targets": [], **data})
            config = QuantizationConfig(
                config_groups={"group_0": scheme},
                quantization_status=QuantizationStatus.INITIALIZED,
            )
        else:
            groups = {k: QuantizationScheme.model_validate({"targets": [], **v}) for k, v in data.items()}
            config = QuantizationConfig(
                config_groups=groups, quantization_status=QuantizationStatus.INITIALIZED
            )
    except Exception as e:  # pydantic's ValidationError text names the bad field
        raise SchemeError(f"scheme file {path} is not a valid compressed-tensors scheme: {e}") from None
    return path.stem, config
