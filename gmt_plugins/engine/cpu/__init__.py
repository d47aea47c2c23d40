"""The compiled CPU kernel: its loader and the ctypes wrappers of its operations."""
