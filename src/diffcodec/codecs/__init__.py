"""Codec implementations; each module holds one published method."""
