"""Hypothesis fuzzing of every RPC and REST route: bad input never gets INTERNAL, UNKNOWN or a 5xx."""
