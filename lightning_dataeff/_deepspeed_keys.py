"""DeepSpeed config conventions shared by every entry point (callbacks' ``from_deepspeed``, the importer).

DeepSpeed defaults every ``enabled`` flag to false; unlike DeepSpeed we also respect the parents' flags.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping

__all__ = ["deepspeed_enabled", "warn_ignored_keys"]


def deepspeed_enabled(cfg: Any, where: str) -> bool:
    """``cfg["enabled"]`` of a DeepSpeed section; missing means false (with a warning), as in DeepSpeed.

    Raises ``ValueError`` naming ``where`` when ``cfg`` is not a mapping or ``enabled`` is not a bool.
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(cfg).__name__}")
    if "enabled" not in cfg:
        warnings.warn(f"{where}.enabled is not set; DeepSpeed's default is false, so {where} is off", stacklevel=3)
        return False
    value = cfg["enabled"]
    if not isinstance(value, bool):
        raise ValueError(f"{where}.enabled must be true or false, got {value!r}")
    return value


def warn_ignored_keys(section: Mapping[str, Any], known: Iterable[str], where: str, why: str = "not used") -> list[str]:
    """Warn once about the keys of ``section`` outside ``known``; returns them sorted."""
    ignored = sorted(set(section) - set(known))
    if ignored:
        warnings.warn(f"{where}: keys {ignored} are ignored ({why})", stacklevel=3)
    return ignored
