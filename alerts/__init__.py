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

Differences from Rubin's stamps, on purpose: the stamp WCS carries
``CTYPE1/2 = RA---TAN/DEC--TAN`` (Rubin's stamps have none, so a FITS reader
sees only a linear transformation), ``CRPIX`` is 1-based (Rubin's equals the
0-based ``x - CUTMINX``), the stamp is centred to within half a pixel (Rubin's
``makeCenteredBox`` origin ``floor(x - side/2)`` may be one pixel lower), and a
``MASK`` extension keeps the mask bit planes. See :mod:`alerts.cutouts`.
"""
