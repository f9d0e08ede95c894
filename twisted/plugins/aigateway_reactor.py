"""
twistd reactor drop-in: C{twistd --reactor aigateway}.

C{twistd aigateway} installs this reactor by itself when no other was
chosen; naming it lets other twistd plugins use it too.  Like the service
drop-in, it names the module and imports nothing that installs a reactor.
"""

from twisted.application.reactors import Reactor

aigateway = Reactor(
    "aigateway",
    "aigateway.reactor",
    "epoll without a logging context per event (aigateway's default).",
)
