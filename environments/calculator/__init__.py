"""Arithmetic word tasks solved by calling a `calculator` tool, then answering."""

from environments.calculator.arith import ArithmeticError_, evaluate
from environments.calculator.env import CalculatorEnv

__all__ = ["ArithmeticError_", "CalculatorEnv", "evaluate"]
