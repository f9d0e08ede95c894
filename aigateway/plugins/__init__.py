"""
Drop-in plugins for aigateway: balancer strategies are found here by
L{twisted.plugin.getPlugins}, and third parties add theirs the same way, by
shipping a module in an C{aigateway/plugins} directory on C{sys.path}.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
