"""The compiled CPU kernel: its loader and the signatures of its exported functions."""
