# -*- test-case-name: tests.test_balancer_properties -*-
"""
The built-in balancing algorithms, registered as drop-ins.

Each object here provides C{IPlugin} and L{IBalancerFactory}; third-party
algorithms are registered the same way, from their own drop-in module.
"""

from aigateway.balancer.hashing import ConsistentHashing
from aigateway.balancer.latency import Latency
from aigateway.balancer.leastconn import LeastConnections
from aigateway.balancer.roundrobin import RoundRobin

roundRobin = RoundRobin()
leastConnections = LeastConnections()
consistentHashing = ConsistentHashing()
latency = Latency()
