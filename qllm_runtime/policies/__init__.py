"""Registered lookup policies. Each module of this package defines one and is imported here, so adding a
scoring rule is one new file with a `@register_policy("name")` class."""

from importlib import import_module
from pkgutil import iter_modules

from .base import POLICIES, LookupPolicy, make_policy, register_policy

for _module in iter_modules(__path__):
    if _module.name != "base":
        import_module(f"{__name__}.{_module.name}")

__all__ = ["POLICIES", "LookupPolicy", "make_policy", "register_policy"]
