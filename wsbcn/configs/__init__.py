"""Tuned kernel configs shipped with the package, one JSON file per device."""
