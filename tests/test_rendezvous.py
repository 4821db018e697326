"""Command-line runs that no launcher started take a free MASTER_PORT, so two runs on one machine do not collide."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest

from nspo_trl.utils import free_master_port


@pytest.fixture
def busy_29500():
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):  # someone else already holds it: just as busy
            holder.bind(("localhost", 29500))
        holder.listen()
        yield


def test_a_run_without_a_launcher_takes_a_free_port(monkeypatch, busy_29500):
    for name in ("WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    free_master_port()
    port = int(os.environ["MASTER_PORT"])
    assert port != 29500 and os.environ["MASTER_ADDR"] == "localhost"
    with socket.socket() as probe:
        probe.bind(("localhost", port))  # free indeed


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({"MASTER_PORT": "29731"}, "29731"),  # the user's port
        ({"WORLD_SIZE": "2", "MASTER_PORT": "29500"}, "29500"),  # the launcher's rendezvous
        ({"WORLD_SIZE": "1"}, None),  # a launcher without a port: left to it
    ],
)
def test_a_port_set_by_the_user_or_a_launcher_is_kept(monkeypatch, environment, expected):
    for name in ("WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    free_master_port()
    assert os.environ.get("MASTER_PORT") == expected
