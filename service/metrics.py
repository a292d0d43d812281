"""Prometheus metrics of one app instance (its own registry: no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Everything /metrics exposes; names are part of the operator's contract (README, "Metrics")."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.streams = Gauge("pgpush_streams", "Live SSE streams in this process", registry=r)
        self.streams_opened = Counter("pgpush_streams_opened_total", "Streams accepted", registry=r)
        self.streams_closed = Counter(
            "pgpush_streams_closed_total", "Streams ended, by reason", ["reason"], registry=r
        )
        self.streams_rejected = Counter(
            "pgpush_streams_rejected_total", "Stream requests refused, by reason", ["reason"], registry=r
        )
        self.events_delivered = Counter(
            "pgpush_events_delivered_total", "Message events written to clients", registry=r
        )
        self.rows_replayed = Counter(
            "pgpush_rows_replayed_total", "Rows read from the table to fill new streams", registry=r
        )
        self.rows_fetched = Counter(
            "pgpush_rows_fetched_total", "New rows read by the hub for live streams", registry=r
        )
        self.rows_carried = Counter(
            "pgpush_rows_carried_total",
            "New rows that arrived inside their notification (small statements): no table read",
            registry=r,
        )
        self.delivery_latency = Histogram(
            "pgpush_delivery_latency_seconds",
            "From a live row's created_at to its bytes being written to the client; one observation per "
            "write, of the oldest live row in it (rows replayed to a new stream are not observed)",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.listener_reconnects = Counter(
            "pgpush_listener_reconnects_total", "Times the LISTEN connection was re-established", registry=r
        )
        self.listener_probe_failures = Counter(
            "pgpush_listener_probe_failures_total",
            "NOTIFY round trips over the LISTEN connection that got no answer in time (each one reconnects)",
            registry=r,
        )
        self.listener_connected = Gauge(
            "pgpush_listener_connected", "1 while the LISTEN connection is up", registry=r
        )
        self.notifications = Counter(
            "pgpush_notifications_total", "NOTIFY hints received by the listener", registry=r
        )
        self.announcer_awake = Gauge(
            "pgpush_announcer_awake",
            "1 while this replica's announcer notifies for writers in batches (0: asleep or not elected)",
            registry=r,
        )
        self.statements_announced = Counter(
            "pgpush_statements_announced_total",
            "Writers' statements whose notification this replica's announcer sent in a batch",
            registry=r,
        )
        self.notification_queue_usage = Gauge(
            "pgpush_notification_queue_usage",
            "Postgres' pg_notification_queue_usage() (0..1), sampled at scrape time",
            registry=r,
        )
        self.publish_requests = Counter(
            "pgpush_publish_requests_total", "POST /messages requests, by status", ["status"], registry=r
        )
