"""
Target health: per-node state, active probes and passive outcome counting.
"""
