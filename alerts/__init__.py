"""Alerts: stamps, official Rubin Avro packets, files, Kafka and dead letters (docs/design.md §4.7-4.9).

Modules
-------
cutouts
    ``make_cutouts(sources, bundle, config)`` → FITS stamp bytes per DiaSource.
packet
    ``package_alerts(...)`` → :class:`~alerts.packet.AlertBatch` of schemaless
    Avro payloads in the official ``lsst-alert-packet`` schema.
store
    ``write_alerts(batch, config)`` → ``{visit}_{detector}.avro`` (local or S3,
    atomic); :class:`~alerts.store.DeadLetterStore`.
kafka
    ``produce_alerts(batch, config, dead_letters)`` in Confluent wire format;
    ``replay_dead_letters(store, config)``.

Command line: ``python -m alerts replay SRC --servers HOST:PORT``.

Stamps have Rubin's origin, centre and header (``CUTMINX = x0 - 1`` for a
stamp whose first pixel is detector pixel ``x0``, ``CRPIX = x - CUTMINX``).
Differences from Rubin's stamps, on purpose: the stamp WCS carries
``CTYPE1/2 = RA---TAN/DEC--TAN`` (Rubin's stamps have none, so a FITS reader
sees only a linear transformation), and a ``MASK`` extension keeps the mask bit
planes. See :mod:`alerts.cutouts`.
"""
