"""Servers permit the keepalive pings our clients send.

grpc's default server allowance is one ping per five minutes on a connection that sends no data;
our clients ping every ``KEEPALIVE_TIME_MS``. Where the server allowed fewer, an idle stream (a
job watch) got GOAWAY "too many pings" and broke with UNAVAILABLE.
"""

from __future__ import annotations

from llmops.common.clients import KEEPALIVE_TIME_MS
from llmops.common.server import server_options
from llmops.common.settings import Settings


def test_servers_permit_the_pings_our_clients_send() -> None:
    options = dict(server_options(Settings.load(env={})))
    assert options["grpc.http2.min_ping_interval_without_data_ms"] < KEEPALIVE_TIME_MS
    assert options["grpc.keepalive_permit_without_calls"] == 1
