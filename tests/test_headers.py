"""
Header rewriting between client and target, on its own.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from aigateway.proxy.headers import client_response_headers, upstream_headers


class UpstreamHeadersTests(SynchronousTestCase):
    def test_hop_by_hop_and_named_headers_are_dropped(self) -> None:
        incoming = Headers(
            {
                b"Host": [b"api.example.com:8000"],
                b"Connection": [b"keep-alive, X-Hop, Not A Token"],
                b"X-Hop": [b"1"],
                b"Keep-Alive": [b"timeout=5"],
                b"TE": [b"trailers"],
                b"Expect": [b"100-continue"],
                b"Content-Length": [b"3"],
                b"X-Forwarded-For": [b"10.0.0.1, 10.0.0.2"],
                b"Authorization": [b"Bearer client"],
                b"X-Kept": [b"a", b"b"],
            }
        )
        before = list(incoming.getAllRawHeaders())
        out = upstream_headers(
            incoming,
            b"target:9000",
            b"127.0.0.1",
            b"10.0.0.1",
            b"http",
            b"8000",
            [("Authorization", "Bearer target")],
        )
        names = {name.lower() for name, _ in out.getAllRawHeaders()}
        for gone in (b"connection", b"x-hop", b"keep-alive", b"te", b"expect"):
            assert gone not in names, gone
        assert out.getRawHeaders(b"content-length") is None
        assert out.getRawHeaders(b"host") == [b"target:9000"]
        assert out.getRawHeaders(b"x-forwarded-for") == [
            b"10.0.0.1, 10.0.0.2, 127.0.0.1"
        ]
        assert out.getRawHeaders(b"x-forwarded-host") == [b"api.example.com"]
        assert out.getRawHeaders(b"x-forwarded-port") == [b"8000"]
        assert out.getRawHeaders(b"x-real-ip") == [b"10.0.0.1"]
        assert out.getRawHeaders(b"authorization") == [b"Bearer target"]
        assert out.getRawHeaders(b"x-kept") == [b"a", b"b"]
        # The client's request headers are left as they were.
        assert list(incoming.getAllRawHeaders()) == before


class ClientResponseHeadersTests(SynchronousTestCase):
    def test_target_headers_win_and_hop_by_hop_go(self) -> None:
        source = Headers(
            {
                b"Server": [b"nginx"],
                b"Connection": [b"keep-alive, X-Internal"],
                b"X-Internal": [b"secret"],
                b"Keep-Alive": [b"timeout=5"],
                b"Content-Type": [b"application/json"],
            }
        )
        ours = Headers(
            {
                b"Server": [b"aigateway"],
                b"Date": [b"now"],
                b"X-Request-Id": [b"abc"],
            }
        )
        out = client_response_headers(source, ours)
        assert out.getRawHeaders(b"server") == [b"nginx"]
        assert out.getRawHeaders(b"date") == [b"now"]
        assert out.getRawHeaders(b"x-request-id") == [b"abc"]
        assert out.getRawHeaders(b"content-type") == [b"application/json"]
        for gone in (b"connection", b"x-internal", b"keep-alive"):
            assert not out.hasHeader(gone), gone


class ForwardedHostTests(SynchronousTestCase):
    def test_port_is_dropped_ipv6_kept(self) -> None:
        for host, expected in [
            (b"api.example.com:8000", b"api.example.com"),
            (b"api.example.com", b"api.example.com"),
            (b"[::1]:8000", b"[::1]"),
            (b"[::1]", b"[::1]"),
        ]:
            out = upstream_headers(
                Headers({b"Host": [host]}), b"t", b"p", b"p", b"http", b"80"
            )
            assert out.getRawHeaders(b"x-forwarded-host") == [expected], host
