"""Every server the tests start (Ray, moto) listens on 127.0.0.1 only."""

from __future__ import annotations

import ipaddress
import os

import psutil
import pytest


@pytest.mark.usefixtures("local_ray", "s3_server")
def test_ray_and_moto_listen_only_on_loopback() -> None:
    me = psutil.Process(os.getpid())
    pids = {me.pid} | {child.pid for child in me.children(recursive=True)}
    listening = [
        (conn.pid, conn.laddr.ip, conn.laddr.port)
        for conn in psutil.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids
    ]
    assert len(listening) >= 3, listening  # moto + Ray's GCS and raylet at least
    assert all(is_loopback(ip) for _, ip, _ in listening), listening


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback
