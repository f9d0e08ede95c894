"""
The schema language and the entity rules built on it.
"""

from twisted.trial.unittest import SynchronousTestCase

from aigateway.addresses import format_target, parse_target
from aigateway.admin.forms import parse_body, unflatten
from aigateway.records import build_record, route_regex
from aigateway.schema import Field, flatten, merge, record


class FormTests(SynchronousTestCase):
    """
    Form bodies become nested dicts.
    """

    def test_dotted_and_arrays(self):
        data = unflatten(
            [
                ("healthchecks.active.http_path", "/health"),
                ("healthchecks.active.healthy.interval", "5"),
                ("paths[]", "/a"),
                ("paths[]", "/b"),
                ("methods", "GET"),
                ("methods", "POST"),
                ("hosts[]", ""),
            ]
        )
        self.assertEqual(
            data,
            {
                "healthchecks": {
                    "active": {"http_path": "/health", "healthy": {"interval": "5"}}
                },
                "paths": ["/a", "/b"],
                "methods": ["GET", "POST"],
                "hosts": [],
            },
        )

    def test_json_and_errors(self):
        self.assertEqual(parse_body("application/json", b'{"a": 1}'), ({"a": 1}, False))
        self.assertEqual(parse_body("", b""), ({}, True))
        for body in (b"{", b"[1]"):
            with self.assertRaises(Exception) as caught:
                parse_body("application/json; charset=utf-8", body)
            self.assertEqual(
                caught.exception.body, {"message": "Cannot parse JSON body"}
            )


class RecordTests(SynchronousTestCase):
    """
    Defaults, coercion and Kong's cross-field rules.
    """

    def test_upstream_defaults(self):
        record, errors = build_record("upstreams", {"name": "u"}, False)
        self.assertEqual(errors, {})
        self.assertEqual(record["algorithm"], "round-robin")
        self.assertEqual(record["slots"], 10000)
        active = record["healthchecks"]["active"]
        self.assertEqual(active["healthy"]["successes"], 2)
        self.assertEqual(active["unhealthy"]["tcp_failures"], 2)
        self.assertEqual(active["healthy"]["interval"], 0)
        passive = record["healthchecks"]["passive"]
        self.assertEqual(passive["unhealthy"]["http_statuses"], [429, 500, 503])
        self.assertEqual(passive["unhealthy"]["cooldown"], 30)

    def test_coercion_only_for_forms(self):
        record, errors = build_record(
            "targets", {"target": "a:1", "weight": "5", "backup": "true"}, True
        )
        self.assertEqual(errors, {})
        self.assertEqual((record["weight"], record["backup"]), (5, True))
        _, errors = build_record("targets", {"target": "a:1", "weight": "5"}, False)
        self.assertEqual(errors, {"weight": "expected an integer"})
        _, errors = build_record("targets", {"target": "a:1", "weight": True}, False)
        self.assertEqual(errors, {"weight": "expected an integer"})

    def test_hash_rules(self):
        record, errors = build_record(
            "upstreams",
            {"name": "u", "hash_on": "header", "hash_on_header": "x"},
            False,
        )
        self.assertEqual(errors, {})
        self.assertEqual(record["algorithm"], "consistent-hashing")
        _, errors = build_record("upstreams", {"name": "u", "hash_on": "header"}, False)
        self.assertIn("hash_on_header", errors)
        _, errors = build_record(
            "upstreams",
            {
                "name": "u",
                "hash_on": "cookie",
                "hash_on_cookie": "c",
                "hash_fallback": "ip",
            },
            False,
        )
        self.assertIn("hash_fallback", errors)
        _, errors = build_record(
            "upstreams", {"name": "u", "hash_fallback": "ip"}, False
        )
        self.assertIn("hash_fallback", errors)

    def test_messages(self):
        _, errors = build_record("upstreams", {"name": "bad name", "slots": 5}, False)
        self.assertEqual(errors["slots"], "value should be between 10 and 65536")
        self.assertIn("name", errors)
        self.assertEqual(flatten({"a": {"b": "x"}, "c": "y"}), ["a.b: x", "c: y"])

    def test_route_needs_a_criterion(self):
        _, errors = build_record("routes", {"service": {"id": "s"}}, False)
        self.assertIn("@entity", errors)
        _, errors = build_record(
            "routes", {"paths": ["x"], "service": {"id": "s"}}, False
        )
        self.assertIn("paths", errors)
        _, errors = build_record(
            "routes", {"paths": ["~/(unclosed"], "service": {"id": "s"}}, False
        )
        self.assertIn("paths", errors)

    def test_merge_replaces_arrays(self):
        fields = {"a": record(b=Field("integer"), c=Field("array")), "d": Field("x")}
        self.assertEqual(
            merge(fields, {"a": {"b": 1, "c": [1, 2]}, "d": 1}, {"a": {"c": [3]}}),
            {"a": {"b": 1, "c": [3]}, "d": 1},
        )

    def test_merge_replaces_maps(self):
        """
        Only records merge: a map (a target's headers) is replaced whole, so
        a PATCH can drop one of its keys, as Kong's does.
        """
        fields = {"headers": Field("map")}
        self.assertEqual(
            merge(fields, {"headers": {"a": "1", "b": "2"}}, {"headers": {"a": "3"}}),
            {"headers": {"a": "3"}},
        )


class TargetTests(SynchronousTestCase):
    """
    Target strings.
    """

    def test_parse(self):
        self.assertEqual(parse_target("example.com"), ("example.com", 8000))
        self.assertEqual(parse_target("1.2.3.4:80"), ("1.2.3.4", 80))
        self.assertEqual(parse_target("[::1]:443"), ("::1", 443))
        self.assertEqual(parse_target("::1"), ("::1", 8000))
        for bad in (":::", "a:b", "a:0", "a:70000", "[::1", "[zz]:1", "-bad-:1", ""):
            self.assertIsNone(parse_target(bad), bad)

    def test_format(self):
        self.assertEqual(format_target("::1", 80), "[::1]:80")
        self.assertEqual(format_target("a", 80), "a:80")

    def test_regex_syntax(self):
        self.assertEqual(route_regex("~/v1/(?<model>[^/]+)"), "/v1/(?P<model>[^/]+)")
