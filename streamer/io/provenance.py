"""What a model card says about its origin: the `streamer` block of its YAML front matter.

streamer writes the block into every output's README.md (engine/card.py builds the card around
it) and reads it back to recognise its own work: a sink replaces a destination without being told
to only when streamer wrote it, and a mirroring job compares the recorded source commit and
settings with what it would convert now. This module is all that either side knows of the card.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import yaml

from streamer import __version__


def policy_flags(default_ignore: bool = True, quantize_towers: bool = False, skip_incompatible: bool = False) -> tuple[str, ...]:
    """The non-default choices of the default policy, as the CLI flags that ask for them.

    The card records them (without their dashes) in `Provenance.policy` and in its reproduce
    command. DEFAULT_IGNORE False, QUANTIZE_TOWERS True and SKIP_INCOMPATIBLE True each add one.
    """
    return tuple(
        flag
        for flag, on in (
            ("--no-default-ignore", not default_ignore),
            ("--quantize-towers", quantize_towers),
            ("--skip-incompatible", skip_incompatible),
        )
        if on
    )


@dataclass(frozen=True)
class Provenance:
    """The origin of one conversion, as its model card records it.

    SOURCE is the repo id or local path converted, SOURCE_COMMIT the exact Hub commit (None for a
    folder), SCHEME the preset name, IGNORE the modules kept unquantized on request,
    DEQUANT_DTYPE the dtype a quantized source was expanded to, POLICY the non-default policy
    choices (`policy_flags` without dashes: no-default-ignore, quantize-towers,
    skip-incompatible; empty: embeddings, head, routers and towers kept unquantized), NONFINITE
    the weights that held NaN or Inf and were quantized as they were (`--nonfinite
    passthrough`), QUALITY False when the run skipped the quality report (`--no-quality`).

    The last two are written only when they differ from an ordinary run's (none, True), so that
    the card of an ordinary run reads as before and earlier outputs still count as up to date.
    """

    source: str
    source_commit: str | None
    scheme: str
    ignore: tuple[str, ...]
    streamer_version: str = __version__
    dequant_dtype: str | None = None
    policy: tuple[str, ...] = ()
    nonfinite: tuple[str, ...] = ()
    quality: bool = True

    def settings_key(self) -> str:
        """What must match for an existing conversion to count as up to date.

        The policy is always part of it, so conversions written before streamer kept
        embeddings, heads and routers unquantized by default count as out of date once."""
        blob = json.dumps(
            {
                "scheme": self.scheme,
                "ignore": list(self.ignore),
                "dequant_dtype": self.dequant_dtype,
                "policy": list(self.policy),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        """The `streamer` block as written into the front matter (with its `settings` key)."""
        d = asdict(self)
        d["ignore"] = list(self.ignore)
        d["policy"] = list(self.policy)
        d["nonfinite"] = list(self.nonfinite)
        for key, ordinary in (("nonfinite", []), ("quality", True)):
            if d[key] == ordinary:
                del d[key]
        d["settings"] = self.settings_key()
        return d

    def produced(self, block: dict | None, *, allow_nonfinite: bool) -> bool:
        """Whether the card block BLOCK (`read_provenance`) records an output this conversion
        would write as well: the same block, except that it may hold a quality report this run
        would skip, and weights quantized with their NaN or Inf only when this run
        (ALLOW_NONFINITE) would quantize them too rather than stop."""
        if not isinstance(block, dict):
            return False
        block = dict(block)
        nonfinite, quality = block.pop("nonfinite", []), block.pop("quality", True)
        if nonfinite and not allow_nonfinite:
            return False
        if self.quality and quality is not True:
            return False
        mine = self.to_dict()
        for key in ("nonfinite", "quality"):
            mine.pop(key, None)
        return block == mine


def front_matter(readme: str | None) -> dict:
    """The YAML front matter of the model card README (text), or {} when it has none or it is not a mapping."""
    if not readme or not readme.startswith("---"):
        return {}
    end = readme.find("\n---", 3)
    if end < 0:
        return {}
    try:
        meta = yaml.safe_load(readme[3:end])
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def read_provenance(readme: str | None) -> dict | None:
    """The `streamer` block of the model card README (text), or None when streamer did not write it."""
    block = front_matter(readme).get("streamer")
    return block if isinstance(block, dict) else None
