"""
The Admin API: a Klein app, in Kong's shape.
"""
