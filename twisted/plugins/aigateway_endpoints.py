"""
twistd endpoint drop-in: C{reuseport:PORT} listeners (see
L{aigateway.reuseport}), for C{--proxy} and any other endpoint string.

The parser module imports no reactor.
"""

from aigateway.reuseport import ReusePortParser

reuseport = ReusePortParser()
