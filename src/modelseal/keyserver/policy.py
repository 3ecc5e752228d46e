"""Grant policies: an optional CEL expression over identity, licence, evidence claims and time.

Variables: ``identity`` (list of the host's names), ``host`` (its ``spki:`` name), ``model``,
``key_id``, ``licence`` (``releases``, ``max_releases``, ``hosts``, ``max_hosts``), ``usage`` (the
grant's reported ``requests``, ``items``, ``input_tokens``, ``output_tokens`` and ``tokens`` this period,
with ``_today`` and ``_total`` variants: :func:`modelseal.keyserver.usage.policy_usage`), ``claims`` (a
map from evidence kind to verified claims) and ``now`` (a timestamp). Examples:
``licence.releases < 100 && now < timestamp("2027-01-01T00:00:00Z")``, ``usage.items_today < 1000000``.
Anything other than a boolean ``true`` denies; an evaluation error denies too (fail closed).
"""

from __future__ import annotations

import datetime as dt
from functools import lru_cache
from typing import Any

from modelseal.errors import MissingDependencyError, ModelsealError


class PolicyError(ModelsealError):
    """The policy expression does not compile or does not evaluate to a boolean."""


@lru_cache(maxsize=256)
def _compile(source: str) -> Any:
    try:
        import cel
    except ImportError:
        raise MissingDependencyError("grant policies need the CEL engine: pip install 'modelseal[keyserver]'") from None
    try:
        return cel.compile(source)
    except (ValueError, RuntimeError) as exc:
        raise PolicyError(f"policy does not compile: {str(exc).splitlines()[0]}") from None


class Policy:
    def __init__(self, source: str) -> None:
        if len(source) > 4096:
            raise PolicyError("policy is longer than 4096 characters")
        self.source = source
        self._program = _compile(source)

    def allows(self, variables: dict[str, Any]) -> bool:
        context = dict(variables)
        context["now"] = dt.datetime.fromtimestamp(int(variables["now"]), dt.UTC)
        try:
            result = self._program.execute(context)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise PolicyError(str(exc).splitlines()[0]) from None
        if not isinstance(result, bool):
            raise PolicyError(f"policy evaluated to {type(result).__name__}, not a boolean")
        return result
