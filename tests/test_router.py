"""
Route matching precedence and path joining.
"""

from twisted.trial.unittest import SynchronousTestCase

from aigateway.model import Route, Service
from aigateway.proxy.router import Router, join_path, normalize_path


def route(id, paths=(), hosts=(), methods=(), models=(), strip=True, priority=0):
    return Route(
        id=id,
        name=id,
        service_id="s",
        paths=tuple(paths),
        hosts=tuple(hosts),
        methods=frozenset(methods),
        models=frozenset(models),
        strip_path=strip,
        preserve_host=False,
        regex_priority=priority,
    )


SERVICE = Service(
    id="s",
    name="s",
    protocol="http",
    host="h",
    port=80,
    path=None,
    retries=5,
    connect_timeout=1,
    write_timeout=1,
    read_timeout=1,
    retry_on_statuses=frozenset(),
)


class RouterTests(SynchronousTestCase):
    def match(self, routes, path, host="h", method="GET", model=None):
        found = Router(tuple(routes), {"s": SERVICE}).match(
            host, method, path, lambda: model
        )
        return None if found is None else (found.route.id, found.path)

    def test_longest_prefix_wins(self):
        routes = [route("short", ["/v1"]), route("long", ["/v1/chat"])]
        self.assertEqual(
            self.match(routes, "/v1/chat/completions"), ("long", "/completions")
        )
        self.assertEqual(self.match(routes, "/v1/models"), ("short", "/models"))
        self.assertIsNone(self.match(routes, "/v2"))

    def test_strip_path_off(self):
        self.assertEqual(
            self.match([route("r", ["/v1"], strip=False)], "/v1/x"), ("r", "/v1/x")
        )

    def test_more_specific_wins(self):
        routes = [
            route("any", ["/"]),
            route("post", ["/"], methods=["POST"]),
            route("host", ["/"], hosts=["*.example.com"]),
        ]
        self.assertEqual(self.match(routes, "/x", method="POST")[0], "post")
        self.assertEqual(self.match(routes, "/x", host="a.example.com")[0], "host")
        self.assertEqual(self.match(routes, "/x")[0], "any")

    def test_regex_and_captures(self):
        routes = [route("re", ["~/models/(?<model>[^/]+)"])]
        found = Router(tuple(routes), {"s": SERVICE}).match(
            "h", "GET", "/models/gpt-4o/chat"
        )
        self.assertEqual(found.captures, {"model": "gpt-4o"})
        self.assertEqual(found.path, "/chat")

    def test_models(self):
        routes = [
            route("gpt", ["/v1"], models=["gpt-4o"]),
            route("llama", ["/v1"], models=["llama3"]),
            route("rest", ["/v1"]),
        ]
        self.assertEqual(
            self.match(routes, "/v1/chat", method="POST", model="llama3")[0], "llama"
        )
        self.assertEqual(
            self.match(routes, "/v1/chat", method="POST", model="gpt-4o")[0], "gpt"
        )
        self.assertEqual(
            self.match(routes, "/v1/chat", method="POST", model=None)[0], "rest"
        )

    def test_join(self):
        self.assertEqual(join_path(None, "/a"), "/a")
        self.assertEqual(join_path(None, ""), "/")
        self.assertEqual(join_path("/base", ""), "/base")
        self.assertEqual(join_path("/base/", "/a"), "/base/a")
        self.assertEqual(join_path("/base", "a"), "/base/a")
        self.assertEqual(join_path("/base", "/a"), "/base/a")


class NormalizePathTests(SynchronousTestCase):
    """
    Dot segments, encoded or not, are resolved before routing.
    """

    def test_cases(self) -> None:
        cases = {
            "/v1/chat": "/v1/chat",
            "/v1//chat": "/v1//chat",
            "/v1/models/a%2Fb": "/v1/models/a%2Fb",
            "/t/../s/a": "/s/a",
            "/../../s": "/s",
            "/a/./b/.": "/a/b/",
            "/a/b/..": "/a/",
            "/a/%2e%2E/b": "/b",
            "/a/.hidden/b": "/a/.hidden/b",
            "/..": "/",
        }
        for given, wanted in cases.items():
            self.assertEqual(normalize_path(given), wanted, given)
