"""What a completed request costs: the AI Gateway's ``llmRequestCosts``, computed from its usage. No I/O.

Each cost has a ``metadataKey`` (its name) and a type: ``InputToken``, ``OutputToken``, ``TotalToken``, or ``CEL``,
an expression over ``model``, ``backend``, ``input_tokens``, ``output_tokens`` and ``total_tokens`` evaluated by the
`common-expression-language <https://pypi.org/project/common-expression-language/>`_ package (CEL's Rust
implementation: ~3 µs an evaluation, where the pure-Python ``cel-python`` takes ~240 µs, which would make CEL
costs the sidecar's bound at a few thousand completions a second).

One difference from the AI Gateway, checked when the config loads: the token counts are CEL ``int`` here (Python
hands CEL no ``uint``), so write ``input_tokens * 3``, not ``input_tokens * 3u`` or ``uint(3)``. An expression is
compiled and tried once on sample values at load, so a typo, an unknown variable or a type error is a config error
naming the cost, not a silent zero at run time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cel

__all__ = ["CEL_VARIABLES", "CostError", "RequestCosts", "compile_cel"]

#: The variables a CEL cost may use.
CEL_VARIABLES = ("model", "backend", "input_tokens", "output_tokens", "total_tokens")
_TOKEN_TYPES = {"InputToken": "input_tokens", "OutputToken": "output_tokens", "TotalToken": "total_tokens"}
_SAMPLES: tuple[dict[str, Any], ...] = (
    {"model": "", "backend": "", "input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
    {"model": "gpt-4o-mini", "backend": "openai", "input_tokens": 12, "output_tokens": 30, "total_tokens": 42},
)


class CostError(ValueError):
    """A CEL cost that cannot be used, or that failed on one request's values."""


def compile_cel(expression: str) -> cel.Program:
    """Compile ``expression`` and try it on sample values: it must use only :data:`CEL_VARIABLES` and give a
    non-negative integer."""
    try:
        program = cel.compile(expression)
    except ValueError as e:
        raise CostError(f"invalid CEL expression: {_first_line(e)}") from None
    unknown = sorted(set(program.variables()) - set(CEL_VARIABLES))
    if unknown:
        raise CostError(
            f"unknown variable {', '.join(map(repr, unknown))} in CEL expression; "
            f"the variables are {', '.join(CEL_VARIABLES)}"
        )
    for sample in _SAMPLES:
        try:
            _evaluate(program, sample)
        except ZeroDivisionError:
            continue  # e.g. total_tokens / input_tokens on the zeros: a request's values decide
        except CostError as e:
            hint = ""
            if "overload" in str(e):
                hint = " (token counts are CEL int here: write 3, not 3u or uint(3))"
            raise CostError(f"{e}{hint}") from None
    return program


@dataclass(frozen=True, slots=True)
class _Cost:
    key: str
    variable: str  # the token count it takes, or "" for CEL
    program: cel.Program | None


class RequestCosts:
    """The costs of one config, ready to compute. ``costs`` holds ``(metadataKey, type, cel)`` triples."""

    __slots__ = ("_costs",)

    def __init__(self, costs: Sequence[tuple[str, str, str]] = ()) -> None:
        built: list[_Cost] = []
        for key, kind, expression in costs:
            if kind == "CEL":
                built.append(_Cost(key, "", compile_cel(expression)))
            elif kind in _TOKEN_TYPES:
                built.append(_Cost(key, _TOKEN_TYPES[kind], None))
            else:
                raise CostError(f"unknown cost type {kind!r}")
        self._costs = tuple(built)

    def compute(
        self, model: str, backend: str, input_tokens: int, output_tokens: int, total_tokens: int
    ) -> tuple[dict[str, int], list[str]]:
        """Every cost of one request, and what went wrong (a CEL cost that failed on these values is left out
        and named in the second list)."""
        values: dict[str, Any] = {
            "model": model, "backend": backend,
            "input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": total_tokens,
        }  # fmt: skip
        out: dict[str, int] = {}
        errors: list[str] = []
        for c in self._costs:
            if c.program is None:
                out[c.key] = max(0, int(values[c.variable]))
                continue
            try:
                out[c.key] = _evaluate(c.program, values)
            except (CostError, ZeroDivisionError) as e:
                errors.append(f"{c.key}: {_first_line(e)}")
        return out, errors


def _evaluate(program: cel.Program, values: dict[str, Any]) -> int:
    try:
        result = program.execute(values)
    except ZeroDivisionError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError):
        raise
    except BaseException as e:  # TypeError, RuntimeError, OverflowError, ... and a Rust panic (a BaseException)
        raise CostError(f"CEL evaluation failed: {_first_line(e)}") from None
    if isinstance(result, bool) or not isinstance(result, int):
        kind = type(result).__name__
        raise CostError(f"CEL expression must give an integer, not {kind} ({result!r}); wrap it in int()")
    if result < 0:
        raise CostError(f"CEL expression gave {result}; a cost must not be negative")
    return result


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
