"""The paper's experiments as importable functions (used by experiments/reproduce.py and
the notebooks): setup, Theorem 1 on the model, first-epoch dominance, merging after k
epochs vs at convergence, ATM, trajectories, and the report."""
