"""Tessera's tests, one folder per package; a package so `tests/models` never shadows `models`.
Nothing outside tests/ imports from here."""
