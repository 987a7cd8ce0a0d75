"""Which modules a conversion takes: glob patterns on qualified names, and the report of what it did and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn


@dataclass
class ConversionReport:
    """What :func:`convert` did: the layers it converted and why it left the other candidates dense."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Every name of the converted layers (a module registered under several names has all of them)."""
        return [name for entry in self.converted for name in entry.split(" = ")]

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s): {', '.join(self.converted) or '-'}"]
        lines += [f"kept dense {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def check_patterns(module: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]) -> None:
    """Raise if a glob pattern of ``include`` or ``exclude`` matches no module name of ``module``."""
    names = [name for name, _ in module.named_modules(remove_duplicate=False)]
    for option, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatchcase(name, pattern) for name in names):
                raise ValueError(f"`{option}` pattern {pattern!r} matches no module; names look like {names[1:6]}")


def pattern_reason(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> str | None:
    """Why the module ``name`` is not selected by the patterns (the root cannot be replaced), or None."""
    if not name:
        return "the root module cannot be replaced in place; convert its parent"
    if include and not any(fnmatchcase(name, p) for p in include):
        return "not matched by `include`"
    if any(fnmatchcase(name, p) for p in exclude):
        return "matched by `exclude`"
    return None
