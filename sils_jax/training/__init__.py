"""Wires formulas, models and data together: states, the train step, the loop."""
