"""
Load-balancing strategies: each a provider of L{IBalancerFactory} registered
by name as a C{twisted.plugin} drop-in in L{aigateway.plugins}.
"""
