"""Weight quantisation solvers, independent of any export format (GPTQ)."""
