"""Evaluation: mean accepted tokens, tree tuning, greedy divergences explained, the end-to-end
bench and its report."""
