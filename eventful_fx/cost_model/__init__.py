"""Cost model: MACs and state memory of an eventful graph as functions of each gate's k, and the budget solver."""
