"""A safe arithmetic evaluator: parses with `ast`, walks a whitelist, never calls `eval`.

Numbers and intermediate results are bounded so that `9**9**9` or a 10^5-character expression costs
nothing; every failure is an `ArithmeticError_` whose message is fit to show the model.
"""

from __future__ import annotations

import ast
import math
import operator

MAX_EXPRESSION_CHARS = 200
MAX_ABS_VALUE = 10**15
MAX_EXPONENT = 64

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class ArithmeticError_(ValueError):
    """The expression is not plain bounded arithmetic (message is model-facing)."""


def _check(value: float | int) -> float | int:
    if isinstance(value, float) and not math.isfinite(value):
        raise ArithmeticError_("result is not a finite number")
    if abs(value) > MAX_ABS_VALUE:
        raise ArithmeticError_(f"numbers must stay within ±{MAX_ABS_VALUE:.0e}")
    return value


def _eval(node: ast.AST) -> float | int:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ArithmeticError_(f"exponents must be at most {MAX_EXPONENT}")
        try:
            return _check(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ArithmeticError_("division by zero") from None
        except OverflowError:
            raise ArithmeticError_("result is too large") from None
    raise ArithmeticError_("only numbers, + - * / // % ** and parentheses are allowed")


def evaluate(expression: str) -> int | float:
    """Evaluate plain arithmetic; integral results come back as `int`.

    Example:
        >>> evaluate("47 * 38 + 12")
        1798
    """
    if not isinstance(expression, str):
        raise ArithmeticError_("expression must be a string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ArithmeticError_(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ArithmeticError_("expression is not valid arithmetic") from None
    try:
        value = _eval(tree)
    except RecursionError:
        raise ArithmeticError_("expression is nested too deeply") from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def format_number(value: int | float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"
