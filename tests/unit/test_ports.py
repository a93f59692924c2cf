"""Ports checked before anything starts, and the metrics port of each of several workers."""

import socket

from shared.ports import port_taken, worker_metrics_ports


def test_workers_count_up_from_the_first_port_past_the_taken_ones() -> None:
    assert worker_metrics_ports(9101, 1, {8000, 9102}) == [9101]
    assert worker_metrics_ports(9101, 3, {8000, 9102}) == [9101, 9103, 9104]
    assert worker_metrics_ports(9101, 2, {9101}) == [9102, 9103]
    assert worker_metrics_ports(0, 2, {9102}) == [0, 0]


def test_a_listening_port_is_taken_and_a_closed_one_is_not() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_taken("127.0.0.1", port) == "Address already in use"
    assert port_taken("127.0.0.1", port) is None
