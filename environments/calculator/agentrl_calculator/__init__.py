"""Arithmetic word tasks solved by calling a `calculator` tool, then answering."""

from agentrl_calculator.arith import ArithmeticError_, evaluate
from agentrl_calculator.env import CalculatorEnv

__all__ = ["ArithmeticError_", "CalculatorEnv", "evaluate"]
