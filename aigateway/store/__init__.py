"""
Where configuration is kept: L{IStore} and its implementations.
"""
