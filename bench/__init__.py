"""The bench: runs one cell (framework x task x settings) inside a framework environment
and writes one JSON result. Imports only the standard library, numpy and one framework."""
