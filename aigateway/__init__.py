"""
aigateway: an event-driven AI gateway on Twisted.

The public surface is small on purpose: the version, and what a third party
needs to write a balancing algorithm plugin.  Everything else is internal.
"""

from ._version import __version__
from .balancer.context import PickContext
from .balancer.interfaces import IBalancer, IBalancerFactory, IHealthView, ISuccessor

__all__ = [
    "IBalancer",
    "IBalancerFactory",
    "IHealthView",
    "ISuccessor",
    "PickContext",
    "__version__",
]
