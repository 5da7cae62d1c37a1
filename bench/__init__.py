"""The bench: runs one cell (framework x task x settings) inside a framework environment
and writes one JSON result. Imports only the standard library, numpy and one framework.

The harness shares only the standard-library modules ``specs`` (task specifications),
``result`` with ``result.schema.json`` (the result contract) and ``host`` (host facts in it).
"""
