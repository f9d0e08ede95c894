"""
twistd drop-in for aigateway.

It stays one line of substance, as Twisted's own C{twisted_web.py}: twistd
imports every drop-in before it installs the reactor chosen with
C{--reactor}, so nothing imported from here may import the reactor.
"""

from twisted.application.service import ServiceMaker

aigateway = ServiceMaker(
    "aigateway",
    "aigateway.tap",
    "An event-driven AI gateway: reverse proxy, load balancer and Admin API.",
    "aigateway",
)
