"""The swarm health dashboard (``corolla monitor``) and the state it shows.

:mod:`corolla.monitor.state` turns DHT records into one JSON-able picture of each model (pure; also the
source of ``corolla health``'s table and ``--json``), :mod:`corolla.monitor.collector` refreshes it from
the DHT on a thread, and :mod:`corolla.monitor.app` serves it as a web page and ``/api/v1/state``.
The monitor only reads the DHT; it never calls a server.
"""
