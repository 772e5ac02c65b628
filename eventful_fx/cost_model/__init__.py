"""Cost model: MACs and state memory of an eventful graph as sympy expressions of N and each gate's k
(`expressions`), the budget solver that picks each gate's k (`solver`), and the planner that also
picks which regions are gated under a budget and a memory cap (`planner`)."""
from .expressions import CostModel, build_cost_model
from .planner import Decision, Planner
from .solver import BudgetSolver, uniform_ks

__all__ = ["CostModel", "build_cost_model", "Decision", "Planner", "BudgetSolver", "uniform_ks"]
