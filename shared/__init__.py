"""Code every Kiln service uses: event schemas, subjects, the bus, settings, telemetry."""
